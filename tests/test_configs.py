"""Every shipped params file in configs/ validates, names each key by its canonical name, points at a real
model (never a random `tiny-*` preset), and trains what its name says: SD1.5 at 512, SDXL at 1024, a LoRA
or a full fine-tune. The demo's params.yaml is the one file that trains a preset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.params import Params, SamplePrompt, field_names, load_params, sections
from pipeline.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# What each file trains, read from its name: <family>-<mode>.yaml.
RESOLUTION = {"sd15": (512, 512), "sdxl": (1024, 1024)}
MODE = {"lora": "lora", "full": "full"}


def raw(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def strings(value: Any) -> Iterator[str]:
    """Every string in a parsed YAML document, keys and values, at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def test_the_four_jobs_are_shipped():
    assert [path.name for path in CONFIGS] == ["sd15-full.yaml", "sd15-lora.yaml", "sdxl-full.yaml", "sdxl-lora.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_validates(path):
    params = load_params(path)
    assert isinstance(params, Params)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_has_every_section(path):
    assert list(raw(path)) == list(Params.model_fields)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_uses_no_tiny_preset(path):
    presets = [value for value in strings(raw(path)) if value in PRESETS or value.startswith("tiny-")]
    assert presets == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_model_captioning_and_tagging_are_off(path):
    # Captions come from the user's sidecars; a captioner or tagger is an explicit opt-in.
    params = load_params(path)
    assert params.caption.model is None
    assert params.tag.model is None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_resolution_and_mode_match_the_file_name(path):
    family, mode = path.stem.split("-")
    params = load_params(path)
    assert params.bucket.resolution == RESOLUTION[family]
    assert params.train.mode == MODE[mode]
    for prompt in params.train.sample_prompts:
        assert (prompt.width, prompt.height) == RESOLUTION[family]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_key_is_canonical(path):
    # An alias (lr, train_batch_size, sample_steps ...) validates, but a shipped file teaches the name
    # `kiln params --explain` lists first.
    problems = []
    for section, values in raw(path).items():
        fields = sections()[section].model_fields
        aliases = {alias: name for name, field in fields.items() for alias in field_names(name, field)[1:]}
        for key in values:
            if key in aliases:
                problems.append(f"{section}.{key} is an alias of {section}.{aliases[key]}")
            elif key not in fields:
                problems.append(f"{section}.{key} is not a key")
    for prompt in raw(path)["train"].get("sample_prompts", []):
        problems += [f"train.sample_prompts.{key} is not a key" for key in prompt if key not in SamplePrompt.model_fields]
    assert problems == []


def test_only_the_demo_params_train_a_preset():
    shipped = [ROOT / "params.yaml", *CONFIGS]
    on_presets = [path.name for path in shipped if raw(path)["model"]["base"].startswith("tiny-")]
    assert on_presets == ["params.yaml"]
