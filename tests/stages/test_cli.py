"""The `kiln` command as users run it, through Typer's CliRunner."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.tables import read_table
from stages.cli import app
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
STAGES = ["demo-data", "scan", "caption", "tag", "bucket", "cache", "balance", "train", "params"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in STAGES:
        assert stage in result.output


@pytest.mark.parametrize("stage", ["scan", "caption", "tag", "bucket", "cache", "balance", "train", "params"])
def test_stage_help_documents_params_and_set(stage):
    result = runner.invoke(app, [stage, "--help"])
    assert result.exit_code == 0
    output = plain(result.output)
    assert "--params" in output and "--set" in output


def test_demo_scan_bucket_through_the_cli(project):
    assert runner.invoke(app, ["demo-data"]).exit_code == 0
    scan = runner.invoke(app, ["scan"])
    assert scan.exit_code == 0, scan.output
    assert "scan: 22 images, 0 rejected" in plain(scan.output)
    bucket = runner.invoke(app, ["bucket", "--set", "bucket.resolution=768"])
    assert bucket.exit_code == 0, bucket.output
    rows = read_table(project / "data/bucket/buckets.parquet")
    assert len(rows) == 22
    # At 768 the square bucket is 768x768: the override reached the stage.
    assert any(row["bucket"] == "768x768" for row in rows)


def test_misspelt_set_key_fails_before_work_with_one_line_and_no_traceback(project):
    runner.invoke(app, ["demo-data"])
    result = runner.invoke(app, ["scan", "--set", "scan.min_sid=10"])
    assert result.exit_code == 2
    output = plain(result.output)
    assert "error: --set scan.min_sid=10: scan.min_sid: unknown key in section 'scan'; did you mean 'min_side'?" in output
    assert "Traceback" not in output
    assert not (project / "data/scan").exists()


def test_bad_value_in_params_file(project):
    (project / "params.yaml").write_text("bucket:\n  bucket_reso_steps: -64\n")
    result = runner.invoke(app, ["bucket"])
    assert result.exit_code == 2
    assert "bucket.bucket_reso_steps: Input should be greater than or equal to 1 (got -64)" in plain(result.output)


def test_bucket_before_scan_says_what_to_run(project):
    result = runner.invoke(app, ["bucket"])
    assert result.exit_code == 2
    assert "run `kiln scan` first" in plain(result.output)


def test_params_explain_and_resolved(project):
    explain = runner.invoke(app, ["params", "--explain"])
    assert explain.exit_code == 0
    assert "bucket.bucket_no_upscale: bool = False" in explain.output
    assert "train.learning_rate: float = 0.0001 (alias: lr)" in explain.output
    resolved = runner.invoke(app, ["params", "--set", "train.lr=3e-5"])
    assert resolved.exit_code == 0
    assert "learning_rate: 3.0e-05" in resolved.output


def test_python_dash_m_runs_the_stage(demo_root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("scan:\n  workers: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "stages.scan", "--params", str(params), "--data-root", str(demo_root), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert len(read_table(tmp_path / "o/images.parquet")) == 22


def test_disk_error_names_the_file_without_traceback(project, monkeypatch):
    import errno

    import pipeline.tables as tables

    runner.invoke(app, ["demo-data"])

    def full_disk(table, where, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tables.pq, "write_table", full_disk)
    result = runner.invoke(app, ["scan"])
    assert result.exit_code == 2
    output = plain(result.output)
    assert "error: data/scan/images.parquet: could not write ([Errno 28] No space left on device)" in output
    assert "Traceback" not in output


def test_caption_and_tag_through_the_cli_with_presets(project):
    runner.invoke(app, ["demo-data"])
    runner.invoke(app, ["scan"])
    caption = runner.invoke(app, ["caption", "--set", "caption.model=tiny-blip", "--set", "caption.max_new_tokens=4"])
    assert caption.exit_code == 0, caption.output
    assert "  model captions: 4 generated now, 0 from the cache" in plain(caption.output).splitlines()
    tag = runner.invoke(app, ["tag", "--set", "tag.model=tiny-wd14"])
    assert tag.exit_code == 0, tag.output
    assert "tag: 14 images tagged by tiny-wd14 (14 now, 0 from the cache)" in plain(tag.output)
    assert len(read_table(project / "data/tag/tags.parquet")) == 14  # train images only (tag.reg_images: false)


def test_missing_caption_model_is_one_clear_line(project):
    runner.invoke(app, ["demo-data"])
    runner.invoke(app, ["scan"])
    result = runner.invoke(app, ["caption", "--set", "caption.model=/nowhere/blip"])
    assert result.exit_code == 2
    assert "error: caption.model: '/nowhere/blip' not found. Point caption.model at a local model folder" in plain(result.output)


@pytest.fixture
def one_image(project):
    """One 256x256 image (65,536 pixels), scanned and bucketed."""
    write_image(project / "data/raw/train/1_x/a.png", size=(256, 256))
    for stage in ("scan", "bucket"):
        assert runner.invoke(app, [stage]).exit_code == 0
    return project


@pytest.mark.parametrize(
    ("stage", "done"),
    [
        ("caption", "model captions: 1 generated now, 0 from the cache"),
        ("tag", "tag: 1 images tagged by tiny-wd14 (1 now, 0 from the cache)"),
        ("cache", "cache: 1 encoded, 0 reused, 0 repaired, 0 garbage"),
    ],
)
def test_image_stages_open_images_under_scan_max_pixels_only(one_image, monkeypatch, stage, done):
    # caption and tag are off unless a model is set: the tiny presets stand in for real ones.
    model = {"caption": ["--set", "caption.model=tiny-blip"], "tag": ["--set", "tag.model=tiny-wd14"]}.get(stage, [])
    refused = runner.invoke(app, [stage, *model, "--set", "scan.max_pixels=1000"])
    # Pillow refuses outright past twice its limit, and only warns between the two.
    assert (
        "  failed train/1_x/a.png: cannot read image (DecompressionBombError: Image size (65536 pixels) exceeds "
        "limit of 2000 pixels, could be decompression bomb DOS attack.)"
    ) in plain(refused.output).splitlines()
    # Pillow's own limit lowered under the image: only scan.max_pixels, which scan accepted it under,
    # lets the stage open it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    opened = runner.invoke(app, [stage, *model])
    assert opened.exit_code == 0, opened.output
    assert done in plain(opened.output)


def test_cache_names_the_images_it_could_not_encode_exits_non_zero_and_balance_says_what_helps(project):
    runner.invoke(app, ["demo-data"])
    runner.invoke(app, ["scan"])
    runner.invoke(app, ["bucket", "--set", "bucket.resolution=256", "--set", "bucket.min_bucket_reso=128"])
    Path("data/raw/reg/1_shape/shape_01.png").write_bytes(b"edited after the scan")
    cache = runner.invoke(app, ["cache"])
    assert cache.exit_code == 2
    output = plain(cache.output)
    assert (
        "failed reg/1_shape/shape_01.png: cannot read image (KilnError: data/raw/reg/1_shape/shape_01.png changed "
        "since `kiln scan`; rerun `kiln scan`)" in output
    )
    assert (
        "error: 1 of 23 latents could not be encoded (named above); the others are stored. Fix or remove those "
        "images, then rerun from `kiln scan`\n" in output
    )
    assert "Traceback" not in output
    assert len(read_table(project / "data/latents/manifest.parquet")) == 22
    balance = runner.invoke(app, ["balance"])
    assert balance.exit_code == 2
    assert plain(balance.output).endswith(
        "error: reg/1_shape/shape_01.png: `kiln cache` could not encode this image (it printed why); fix or remove "
        "it, then rerun from `kiln scan`\n"
    )


HINT = "Put images in data/raw/train/<repeats>_<class tokens>/ (for example 'data/raw/train/10_sks dog/'), or run `kiln demo-data`."


def test_an_empty_dataset_fails_the_scan_with_the_layout_hint(project):
    (project / "data/raw/train/10_sks dog").mkdir(parents=True)
    result = runner.invoke(app, ["scan"])
    assert result.exit_code == 2
    assert plain(result.output).splitlines() == [f"error: data/raw: no images to train on: no image files found. {HINT}"]


def test_only_rejected_images_are_named_and_the_scan_fails(project):
    for index in range(7):
        (project / f"data/raw/train/1_x/empty{index}.png").parent.mkdir(parents=True, exist_ok=True)
        (project / f"data/raw/train/1_x/empty{index}.png").write_bytes(b"")
    result = runner.invoke(app, ["scan"])
    assert result.exit_code == 2
    assert plain(result.output).splitlines() == [
        *(f"  rejected train/1_x/empty{index}.png: empty (file is zero bytes)" for index in range(5)),
        "  ... and 2 more (see data/scan/rejected.parquet)",
        "error: data/raw: no images to train on: 7 files found, all rejected (see data/scan/rejected.parquet). " + HINT,
    ]
    assert len(read_table(project / "data/scan/rejected.parquet")) == 7


def test_rejected_images_are_named_with_their_reason(project):
    write_image(project / "data/raw/train/1_x/good.png")
    write_image(project / "data/raw/train/1_x/small.png", size=(8, 8))
    result = runner.invoke(app, ["scan"])
    assert result.exit_code == 0, result.output
    assert "  rejected train/1_x/small.png: too_small (8x8: shorter side below scan.min_side=256)" in plain(result.output).splitlines()


def test_the_data_root_comes_from_params(project):
    write_image(project / "photos/train/1_x/a.png", size=(256, 256))
    moved = ["--set", "scan.data_root=photos"]
    scan = runner.invoke(app, ["scan", *moved])
    assert scan.exit_code == 0, scan.output
    assert "scan: 1 images, 0 rejected" in plain(scan.output)
    assert runner.invoke(app, ["bucket"]).exit_code == 0
    cache = runner.invoke(app, ["cache", *moved])
    assert cache.exit_code == 0, cache.output
    assert "cache: 1 encoded" in plain(cache.output)


def test_train_before_balance_says_which_stage_to_run(project):
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2
    assert plain(result.output).splitlines() == ["error: data/plan/plan.parquet: not found; run `kiln balance` first"]


def test_importing_the_cli_imports_no_heavy_module():
    # `kiln --help` imports stages.cli; torch alone takes seconds to import. Typer and the stage modules
    # load inside main(), where a Ctrl-C is caught: the console script imports this module before that.
    heavy = ["torch", "diffusers", "transformers", "accelerate", "pyarrow", "typer", "stages.common"]
    code = f"import sys, stages.cli; print([name for name in {heavy!r} if name in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # Building the app (what `kiln --help` does) loads every stage module, and still no torch.
    code = "import sys, stages.cli; stages.cli.build_app(); print('torch' in sys.modules, 'pyarrow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False False"


def test_ctrl_c_before_the_command_runs_is_one_line(monkeypatch, capsys):
    import stages.cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stages.cli, "build_app", lambda: interrupted)
    with pytest.raises(SystemExit) as exit_:
        stages.cli.main()
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"
