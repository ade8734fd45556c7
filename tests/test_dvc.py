"""The real `dvc repro` on a temporary copy of the project: only changed stages rerun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.demo_data import write_demo_data
from pipeline.tables import read_table

# Minutes each on 2 cores: the whole graph runs, several times. `make test-slow` runs them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def dvc(project: Path, *args: str, columns: int = 200) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "COLUMNS": str(columns)}
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def ran(output: str) -> set[str]:
    return {stage for stage in ("scan", "caption", "tag", "bucket", "cache", "balance", "train") if f"Running stage '{stage}'" in output}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(max_train_steps=1, workers=0, save_every_n_steps=None)  # keep the graph quick
    # The shipped params run no captioner or tagger; the graph's model caches are tested with the presets.
    params["caption"]["model"], params["tag"]["model"] = "tiny-blip", "tiny-wd14"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for package in ("pipeline", "stages"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    write_demo_data(project / "data" / "raw")
    return project


def encoded(project: Path) -> int:
    """How many latents the last cache run encoded (its summary)."""
    return json.loads((project / "data/latents/summary.json").read_text())["encoded"]


def set_param(project: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def test_repro_reruns_only_what_changed(project: Path):
    """The rerun matrix: each change reruns exactly the stages that depend on it, and encodes only what is new."""
    assert ran(dvc(project, "repro")) == {"scan", "caption", "tag", "bucket", "cache", "balance", "train"}
    assert (project / "models/kiln/kiln.safetensors").is_file()
    assert encoded(project) == 23
    buckets = (project / "data/bucket/buckets.parquet").read_bytes()
    tags = (project / "data/tag/tags.parquet").read_bytes()
    captions = (project / "data/caption/captions.parquet").read_bytes()

    second = dvc(project, "repro")
    assert ran(second) == set()
    assert "Data and pipelines are up to date" in second

    caption = project / "data/raw/train/10_sks circle/circle_01.txt"
    caption.write_text("an edited caption\n")
    edited = dvc(project, "repro")
    # bucket reads only files.parquet (geometry), tag and cache files.parquet and buckets.parquet: none changed.
    assert ran(edited) == {"scan", "caption", "balance", "train"}
    assert (project / "data/bucket/buckets.parquet").read_bytes() == buckets
    assert (project / "data/tag/tags.parquet").read_bytes() == tags
    assert (project / "data/caption/captions.parquet").read_bytes() != captions
    # The captioner ran on nothing: its outputs came from the persisted cache (the 4 train images without
    # a caption; reg images keep their class tokens).
    assert "model captions: 0 generated now, 4 from the cache" in edited

    Image.new("RGB", (320, 320), (10, 200, 30)).save(project / "data/raw/train/10_sks circle/circle_new.png")
    assert ran(dvc(project, "repro")) == {"scan", "caption", "tag", "bucket", "cache", "balance", "train"}
    assert encoded(project) == 1

    set_param(project, "train", "learning_rate", 5e-4)
    assert ran(dvc(project, "repro")) == {"train"}

    (project / "pipeline/noise.py").write_text((project / "pipeline/noise.py").read_text() + "\n# an edit\n")
    assert ran(dvc(project, "repro")) == {"train"}

    set_param(project, "tag", "general_threshold", 0.5)
    assert ran(dvc(project, "repro")) == {"tag", "balance", "train"}

    set_param(project, "balance", "prior_loss_weight", 0.5)
    assert ran(dvc(project, "repro")) == {"balance", "train"}  # and never cache

    dvc_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    gc = subprocess.run([str(BIN / "kiln"), "cache", "--gc"], cwd=project, env=dvc_env, capture_output=True, text=True)
    assert gc.returncode == 0, gc.stderr[-2000:]
    # The store was repacked (the index moved), but its manifest did not change: only cache is stale.
    assert ran(dvc(project, "repro")) <= {"cache"}
    assert encoded(project) == 0

    set_param(project, "bucket", "resolution", 768)
    assert ran(dvc(project, "repro")) == {"bucket", "cache", "balance", "train"}
    assert (project / "data/bucket/buckets.parquet").read_bytes() != buckets

    set_param(project, "model", "base", "tiny-sdxl")
    assert ran(dvc(project, "repro")) == {"cache", "balance", "train"}
    assert encoded(project) == len(read_table(project / "data/latents/keys.parquet"))  # another VAE: every latent again

    out = project / "plots"
    dvc(project, "plots", "show", "-o", str(out))
    html = (out / "index.html").read_text()
    assert "vegaEmbed('#data_bucket_buckets_json'" in html
    assert "Images per aspect-ratio bucket" in html
    assert '"768x768"' in html  # the bucket counts are the rendered plot's data
    assert "models_kiln_plots_metrics" in html.replace("/", "_")  # the training curves


def test_experiment_with_set_param_as_readme_shows(project: Path):
    git = ["git", "-c", "user.name=Kiln test", "-c", "user.email=test@kiln.invalid"]
    (project / ".gitignore").write_text("/data/raw/\n")
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=project, check=True)
    dvc(project, "repro")
    # A bare comma is a sweep to DVC (hydra syntax); README shows the list form, as tested here.
    output = dvc(project, "exp", "run", "-S", "bucket.bucket_no_upscale=true", "-S", "bucket.resolution=[1024,768]")
    assert ran(output) == {"bucket", "cache", "balance", "train"}
    shown = dvc(project, "exp", "show", "--no-pager", "--csv")
    assert "[1024, 768]" in shown


def test_ctrl_c_in_dvc_repro_then_dvc_repro_finishes_the_run(project: Path):
    # Ctrl-C reaches the whole foreground process group: DVC and the trainer it runs. The trainer saves
    # its checkpoint; the next `dvc repro` reruns train, which continues its own run, and the lock is then
    # complete: no `dvc commit`, no start from scratch.
    import signal

    set_param(project, "train", "max_train_steps", 40)
    set_param(project, "train", "network_dim", 4)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    process = subprocess.Popen(
        [str(BIN / "dvc"), "repro"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "train: ready" in line:
            break
    assert any("train: ready" in line for line in lines), "".join(lines)[-3000:]
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "Continue with `kiln train` or `dvc repro`" in "".join(lines) + rest
    again = dvc(project, "repro")
    assert ran(again) == {"train"}
    assert "resumedfrom" in "".join(again.split())  # the log wraps long lines
    assert "train: 40 steps" in again
    status = dvc(project, "status")
    assert "Data and pipelines are up to date" in status, status


GIT = ["git", "-c", "user.name=Kiln test", "-c", "user.email=test@kiln.invalid"]


def commit_all(project: Path, message: str) -> None:
    subprocess.run([*GIT, "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=project, check=True)


def test_a_queued_sweep_reuses_every_store_and_reruns_only_train(project: Path):
    # data/raw is DVC-tracked and the stores are in DVC's cache, so each queued experiment's workspace
    # gets them checked out: no scan, caption, tag or cache work, no latent encoded.
    dvc(project, "add", "data/raw")
    set_param(project, "train", "max_train_steps", 2)  # a second step, so the learning rate shows in the loss
    dvc(project, "repro")
    commit_all(project, "baseline")
    dvc(project, "exp", "run", "--queue", "-S", "train.learning_rate=5e-4,5e-5,2e-5")
    output = dvc(project, "exp", "run", "--run-all")
    stages = [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]
    assert stages == ["train"] * 3, output[-3000:]
    shown = dvc(project, "exp", "show", "--no-pager", "--csv")
    assert shown.count(",Success,") == 3, shown
    # What README advises: the three runs' losses and learning rates, legible in a 120-column terminal.
    table = dvc(project, "exp", "show", "--no-pager", "--only-changed", columns=120)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 120 and "…" not in lines[1], table
    header = lines[1].split()
    assert {"final_loss", "best_loss", "train.learning_rate"} <= set(header), table
    assert all(any(value in line for line in lines) for value in ("0.0005", "5e-05", "2e-05")), table
    # The loss curves of all three, side by side (README: dvc plots diff $(dvc exp ls --name-only)).
    names = dvc(project, "exp", "ls", "--name-only").split()
    assert len(names) == 3
    plots = dvc(project, "plots", "diff", *names, "--json")
    data = json.loads(plots[plots.index("{"):])
    (loss,) = [entries for path, entries in data["data"].items() if path.endswith("loss.tsv")]
    revisions = {point["rev"] for entry in loss for point in entry["content"]["data"]["values"]}
    assert set(names) <= revisions, plots[:3000]


def test_push_then_pull_on_a_fresh_clone_reruns_nothing(project: Path, tmp_path: Path):
    dvc(project, "add", "data/raw")
    dvc(project, "repro")
    dvc(project, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    commit_all(project, "baseline")
    dvc(project, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    dvc(clone, "pull")
    output = dvc(clone, "repro")
    assert ran(output) == set(), output[-3000:]
    assert "Data and pipelines are up to date" in output
