import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.errors import ParamsError
from pipeline.params import (
    BucketParams,
    Params,
    explain,
    load_params,
    parse_override,
    sections,
    validate_params,
)

ROOT = Path(__file__).resolve().parents[2]


def error_of(raw: dict) -> str:
    with pytest.raises(ParamsError) as caught:
        validate_params(raw)
    return str(caught.value)


def test_shipped_params_yaml_loads_and_uses_the_tiny_preset():
    params = load_params(ROOT / "params.yaml")
    assert params.model.base == "tiny-sd15"
    assert params.bucket.resolution == (512, 512)
    # The file spells out every section the code defines, so users see every knob.
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == set(sections())


def test_misspelt_key_names_key_section_and_closest_valid_key():
    message = error_of({"train": {"leraning_rate": 1e-4}})
    assert message == (
        "params.yaml: train.leraning_rate: unknown key in section 'train'; did you mean 'learning_rate'?"
    )


def test_unknown_section_suggests_the_nearest_section():
    assert error_of({"bukcet": {}}) == "params.yaml: unknown section 'bukcet'; did you mean 'bucket'?"


def test_negative_value_is_one_line_naming_key_and_range():
    message = error_of({"scan": {"min_side": -5}})
    assert message == "params.yaml: scan.min_side: Input should be greater than or equal to 1 (got -5)"
    assert "\n" not in message


def test_min_above_max_names_both_keys():
    message = error_of({"bucket": {"min_bucket_reso": 1024, "max_bucket_reso": 512}})
    assert message == "params.yaml: bucket.min_bucket_reso: must be ≤ bucket.max_bucket_reso (got 1024 > 512)"


def test_unknown_enum_lists_allowed_values():
    message = error_of({"bucket": {"interpolation": "nearest"}})
    assert message == "params.yaml: bucket.interpolation: Input should be 'lanczos', 'area' or 'bicubic' (got 'nearest')"


def test_step_must_divide_min_and_max():
    message = error_of({"bucket": {"min_bucket_reso": 250}})
    assert message == "params.yaml: bucket.min_bucket_reso: must be a multiple of bucket.bucket_reso_steps=64 (got 250)"


def test_two_problems_give_two_lines():
    assert error_of({"scan": {"min_sid": 1, "workers": -1}}).splitlines() == [
        "params.yaml: scan.workers: Input should be greater than or equal to 0 (got -1)",
        "params.yaml: scan.min_sid: unknown key in section 'scan'; did you mean 'min_side'?",
    ]


def test_everydream_alias_is_accepted_and_both_names_is_an_error():
    assert validate_params({"train": {"lr": 3e-5}}).train.learning_rate == 3e-5
    assert validate_params({"scan": {"caption_extension": "txt"}}).scan.caption_extensions == [".txt"]
    assert error_of({"train": {"lr": 1e-4, "learning_rate": 2e-4}}) == (
        "params.yaml: train.lr: same setting as train.learning_rate; keep one"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [(512, (512, 512)), ("768", (768, 768)), ("1024,768", (1024, 768)), ([768, 512], (768, 512))],
)
def test_resolution_accepts_kohya_forms(value, expected):
    assert BucketParams(resolution=value).resolution == expected


def test_override_is_read_as_yaml_and_applied(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("bucket:\n  resolution: 512\n")
    params = load_params(path, ["bucket.resolution=1024,768", "train.lr=1e-5", "bucket.random_crop=true"])
    assert params.bucket.resolution == (1024, 768)
    assert params.train.learning_rate == 1e-5
    assert params.bucket.random_crop is True


def test_misspelt_override_is_attributed_to_set(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("{}\n")
    with pytest.raises(ParamsError) as caught:
        load_params(path, ["train.leraning_rate=1e-4"])
    assert str(caught.value) == "--set: train.leraning_rate: unknown key in section 'train'; did you mean 'learning_rate'?"


@pytest.mark.parametrize("override", ["train", "=1", "train.lr", ".lr=1"])
def test_malformed_override(override):
    with pytest.raises(ParamsError, match="expected section.key=value"):
        parse_override(override)


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_every_field_has_a_docstring_and_explain_prints_it():
    text = "\n".join(explain())
    for section, model in sections().items():
        for name, field in model.model_fields.items():
            assert field.description, f"{section}.{name} has no docstring"
            assert f"{section}.{name}:" in text
    assert "(alias: lr)" in text


def test_params_are_frozen():
    params = Params()
    with pytest.raises(ValidationError, match="frozen_instance"):
        params.bucket.seed = 1


def readme_blocks(lang: str) -> list[str]:
    """The fenced blocks of README.md whose info string is lang ("" for a bare fence)."""
    blocks, current, current_lang = [], None, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, current_lang = [], line[3:].strip()
            else:
                if current_lang == lang:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_every_readme_params_example_validates():
    overrides = [o for block in readme_blocks("sh") for o in re.findall(r"(?:--set|-S)\s+(\S+=\S+)", block)]
    yaml_blocks = readme_blocks("yaml")
    assert len(overrides) >= 4 and len(yaml_blocks) >= 2
    for override in overrides:
        key, _, value = override.strip("'\"").partition("=")
        # A bare comma is a DVC sweep (`-S 'train.learning_rate=5e-4,5e-5'`): each value must validate.
        values = value.split(",") if "," in value and not value.startswith("[") else [value]
        for one in values:
            load_params(ROOT / "params.yaml", [f"{key}={one}"])
    for block in yaml_blocks:
        validate_params(yaml.safe_load(block), source="README.md")


def test_readme_error_example_is_the_real_message():
    (session,) = [b for b in readme_blocks("") if b.startswith("$ kiln")]
    command, shown = session.strip().splitlines()
    override = command.split("--set ")[1]
    with pytest.raises(ParamsError) as caught:
        load_params(ROOT / "params.yaml", [override])
    assert shown == f"error: {caught.value}"


def test_unquoted_yaml_no_is_the_string_no():
    assert validate_params(yaml.safe_load("train:\n  mixed_precision: no\n")).train.mixed_precision == "no"


@pytest.mark.parametrize(
    ("key", "value"),
    [("use_log_norm_timesteps", True), ("zero_terminal_snr", True), ("loss_type", "huber"), ("min_snr_gamma", 5.0),
     ("debiased_estimation_loss", True)],
)
def test_rectified_flow_refuses_what_only_the_diffusion_schedule_reads(key, value):
    # No key is silently ignored: under rectified flow a diffusion-only setting is an error naming it.
    message = error_of({"train": {"rectified_flow": True, key: value}})
    assert message.startswith(f"params.yaml: train.{key}: belongs to the diffusion schedule")
    assert "turn rectified_flow off" in message
    validate_params({"train": {key: value}})  # without rectified flow it is fine


def test_rectified_flow_accepts_what_acts_in_it():
    settings = {"rectified_flow": True, "loss_type": "l2", "min_timestep": 100, "max_timestep": 900, "reg_min_timestep": 500,
                "noise_offset": 0.05, "ip_noise_gamma": 0.1, "masked_loss": True, "reflow_steps": 1}
    assert validate_params({"train": settings}).train.reg_timestep_range == (500, 900)
