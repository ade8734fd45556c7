"""What `kiln demo-data`, `kiln caption`, `kiln tag` and `kiln balance` tell the user about captions."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages.cli import app
from tests.stages.test_cli import plain

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
def scanned(tmp_path, monkeypatch):
    """A project with the shipped params.yaml and the demo data, scanned."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    for stage in ("demo-data", "scan"):
        result = runner.invoke(app, [stage])
        assert result.exit_code == 0, result.output
    return tmp_path


def lines(result) -> list[str]:
    return [line.rstrip() for line in plain(result.output).splitlines()]


def test_caption_off_says_where_each_caption_came_from(scanned):
    result = runner.invoke(app, ["caption"])
    assert result.exit_code == 0, result.output
    assert lines(result) == [
        "caption: 22 images, no model (caption.model is null): captions pass through",
        "  11 from their folder's class tokens (no caption file): 'shape'",
        "  9 from sidecar files: 'a sks square, blue'",
        "  2 from yaml sidecars: 'a sks circle, purple'",
    ]


def test_caption_with_a_random_preset_warns_and_spares_reg_images(scanned):
    result = runner.invoke(app, ["caption", "--set", "caption.model=tiny-blip", "--set", "caption.max_new_tokens=4"])
    assert result.exit_code == 0, result.output
    output = lines(result)
    # 4 train images have no caption; the 7 reg images without one keep their class tokens.
    assert "  7 from their folder's class tokens (no caption file): 'shape'" in output
    assert any(line.startswith("  4 from the model (tiny-blip): '") for line in output)
    assert "  warning: tiny-blip is a random model for tests: its captions are noise" in output
    assert "  model captions: 4 generated now, 0 from the cache" in output


def test_tag_off_and_on(scanned):
    off = runner.invoke(app, ["tag"])
    assert off.exit_code == 0, off.output
    assert lines(off) == ["tag: off (tag.model is null): no tags added; yaml sidecar tags still reach the captions"]
    on = runner.invoke(app, ["tag", "--set", "tag.model=tiny-wd14"])
    assert on.exit_code == 0, on.output
    output = lines(on)
    assert output[0].startswith("tag: 14 images tagged by tiny-wd14 (14 now, 0 from the cache); most frequent: ")
    assert output[1].startswith("  for example: '")
    assert output[2] == "  warning: tiny-wd14 is a random model for tests: its tags are noise"


def test_balance_prints_three_final_captions(scanned):
    for stage in ("caption", "tag", "bucket", "cache"):
        result = runner.invoke(app, [stage, "--set", "bucket.resolution=256", "--set", "bucket.min_bucket_reso=128"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["balance"])
    assert result.exit_code == 0, result.output
    output = lines(result)
    start = output.index("training captions, for example:")
    assert output[start + 1:] == [
        "  reg/1_shape/shape_01.png: 'shape'",
        "  train/10_sks circle/circle_01.png: 'a sks circle, red, on a blue gradient'",
        "  train/5_sks square/square_01.png: 'a sks square, blue'",
    ]


def test_demo_data_refuses_a_data_root_holding_your_images(scanned):
    photo = scanned / "data/raw/train/10_me/me.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(b"my photo")
    result = runner.invoke(app, ["demo-data"])
    assert result.exit_code == 2
    assert plain(result.output).startswith(
        "error: data/raw: holds 1 file(s) the demo did not write (train/10_me/me.jpg); the demo writes only into"
    )
    assert photo.read_bytes() == b"my photo"
