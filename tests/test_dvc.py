"""The real `dvc repro` on a temporary copy of the project: only changed stages rerun."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.demo_data import write_demo_data

# Minutes each on 2 cores: the whole graph runs, several times. `make test-slow` runs them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
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
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for package in ("pipeline", "stages"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    write_demo_data(project / "data" / "raw")
    return project


def test_repro_reruns_only_what_changed(project: Path):
    assert ran(dvc(project, "repro")) == {"scan", "caption", "tag", "bucket", "cache", "balance", "train"}
    assert (project / "models/kiln/kiln.safetensors").is_file()
    buckets = (project / "data/bucket/buckets.parquet").read_bytes()
    tags = (project / "data/tag/tags.parquet").read_bytes()
    captions = (project / "data/caption/captions.parquet").read_bytes()

    second = dvc(project, "repro")
    assert ran(second) == set()
    assert "Data and pipelines are up to date" in second

    caption = project / "data/raw/train/10_sks circle/circle_01.txt"
    caption.write_text("an edited caption\n")
    edited = dvc(project, "repro")
    # Bucket reruns (images.parquet changed) and writes identical bytes; tag and cache read only
    # files.parquet and buckets.parquet, which did not change, so DVC skips them.
    assert ran(edited) == {"scan", "caption", "bucket", "balance", "train"}
    assert (project / "data/bucket/buckets.parquet").read_bytes() == buckets
    assert (project / "data/tag/tags.parquet").read_bytes() == tags
    assert (project / "data/caption/captions.parquet").read_bytes() != captions
    # The captioner ran on nothing: its outputs came from the persisted cache.
    assert "0 generated now, 11 from the cache" in edited

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["bucket"]["resolution"] = 768
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran(dvc(project, "repro")) == {"bucket", "cache", "balance", "train"}
    assert (project / "data/bucket/buckets.parquet").read_bytes() != buckets

    params["balance"]["prior_loss_weight"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran(dvc(project, "repro")) == {"balance", "train"}  # and never cache

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
