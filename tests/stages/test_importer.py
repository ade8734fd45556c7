"""`kiln import kohya|everydream` through its Typer sub-app."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from pipeline.params import load_params
from stages import importer
from tests.pipeline.test_importers import DATASET_TOML, ED2_OPTIMIZER, ED2_TRAIN, KOHYA_TOML

runner = CliRunner()


def _kohya_files(tmp_path: Path) -> list[str]:
    (tmp_path / "train.toml").write_text(KOHYA_TOML)
    (tmp_path / "dataset.toml").write_text(DATASET_TOML)
    return ["kohya", "--config_file", str(tmp_path / "train.toml"), "--dataset_config", str(tmp_path / "dataset.toml"),
            "--params", str(tmp_path / "params.yaml")]


def test_kohya_writes_params_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "imported.yaml"
    result = runner.invoke(importer.app, [*_kohya_files(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "  unet_lr                                  -> train.learning_rate                0.0001\n" in result.output
    assert "  cache_latents = True: Kiln always caches latents (the cache stage)\n" in result.output
    assert "  $ mkdir -p 'data/raw/train/10_sks dog' && cp -rl '/data/dog/.' 'data/raw/train/10_sks dog/'\n" in result.output
    assert result.output.endswith(f"wrote {out}\n")
    params = load_params(out)
    assert (params.train.mode, params.train.network_dim, params.bucket.resolution) == ("lora", 32, (768, 768))


def test_everydream_writes_params(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(json.dumps(ED2_TRAIN))
    (tmp_path / "optimizer.json").write_text(json.dumps(ED2_OPTIMIZER))
    out = tmp_path / "imported.yaml"
    args = ["everydream", str(tmp_path / "train.json"), str(tmp_path / "optimizer.json"), "--out", str(out),
            "--params", str(tmp_path / "params.yaml")]
    result = runner.invoke(importer.app, args)
    assert result.exit_code == 0, result.output
    params = load_params(out)
    assert (params.train.mode, params.train.train_text_encoder, params.train.sample_every_n_steps) == ("full", True, 300)


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "params.yaml"
    out.write_text("train: {seed: 7}\n")
    result = runner.invoke(importer.app, [*_kohya_files(tmp_path), "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr == f"error: {out}: already exists; pass --force to overwrite it, or --out to write elsewhere\n"
    assert out.read_text() == "train: {seed: 7}\n"
    result = runner.invoke(importer.app, [*_kohya_files(tmp_path), "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert load_params(out).train.seed == 1234


def test_syntax_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "train.toml").write_text("learning_rate = 1e-4\nunet_lr = \n")
    result = runner.invoke(importer.app, ["kohya", "--config_file", str(tmp_path / "train.toml"), "--out", str(tmp_path / "o.yaml")])
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'train.toml'}:2:11: not valid TOML: Invalid value\n"


def test_unknown_optimizer_exits_2(tmp_path: Path) -> None:
    (tmp_path / "train.toml").write_text('optimizer_type = "DAdaptLion"\n')
    result = runner.invoke(importer.app, ["kohya", "--config_file", str(tmp_path / "train.toml"), "--out", str(tmp_path / "o.yaml"),
                                          "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {tmp_path / 'train.toml'}: optimizer_type = 'DAdaptLion': Kiln has no such optimizer; it has adamw, "
        "adamw8bit, lion, prodigy, adafactor, sgd, adacoor\n"
    )
    assert not (tmp_path / "o.yaml").exists()
