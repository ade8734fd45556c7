import copy
import math
import re
from pathlib import Path
from typing import get_args

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.errors import KilnError, ParamsError
from pipeline.params import (
    BucketParams,
    Params,
    SamplePrompt,
    explain,
    field_names,
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
    assert str(caught.value) == (
        "--set train.leraning_rate=1e-4: train.leraning_rate: unknown key in section 'train'; did you mean 'learning_rate'?"
    )


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


def load_error(path: Path, text: str | bytes, overrides: list[str] | None = None) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ParamsError) as caught:
        load_params(path, overrides or [])
    return str(caught.value)


def test_file_errors_give_the_line_of_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    text = "bucket:\n  resolution: 512\n  min_bucket_reso: 2048\ntrain:\n  learning_rate: .inf\n"
    assert load_error(path, text.replace("  min_bucket_reso: 2048\n", "")) == (
        f"{path}:4: train.learning_rate: Input should be a finite number (got inf)"
    )
    # A cross-field check names its key; the line is that key's.
    assert load_error(path, text).splitlines()[0] == (
        f"{path}:3: bucket.min_bucket_reso: must be ≤ bucket.max_bucket_reso (got 2048 > 1024)"
    )
    assert load_error(path, "train:\n  sample_prompts:\n    - {prompt: a}\n    - {prompt: b, cfg: .nan}\n") == (
        f"{path}:4: train.sample_prompts.1.cfg: Input should be a finite number (got nan)"
    )
    assert load_error(path, "scan: {}\ncahce: {}\n") == f"{path}:2: unknown section 'cahce'; did you mean 'cache'?"


def test_yaml_and_encoding_errors_are_one_line_with_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    assert load_error(path, "bucket:\n  resolution: 512\ntrain: [1, 2\n").startswith(f"{path}:4: not valid YAML: ")
    assert "\n" not in load_error(path, "bucket:\n  resolution: 512\n seed: 1\n")
    assert load_error(path, b"bucket:\n  resolution: 512\n  interpolation: l\xffnczos\n") == (
        f"{path}:3: not UTF-8 text (byte 0xff); save the file as UTF-8"
    )


def test_a_yaml_alias_loop_is_an_error_and_shared_aliases_are_walked_once(tmp_path):
    path = tmp_path / "params.yaml"
    assert load_error(path, "train:\n  optimizer_args: {betas: &a [0.9, *a]}\n") == (
        f"{path}:2: train.optimizer_args: must not contain itself (got {{'betas': [0.9, [...]]}})"
    )
    # A "billion laughs": ten million leaves through seven shared lists; each list is checked once.
    levels = ["&l0 [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]"]
    levels += [f"&l{level} [{', '.join([f'*l{level - 1}'] * 10)}]" for level in range(1, 8)]
    path.write_text(f"train:\n  optimizer_args:\n    betas: [{', '.join(levels)}]\n")
    assert load_params(path).train.optimizer_args["betas"][7][0][0][0][0][0][0][0][0] == 0.9


def test_a_list_is_not_a_params_file_but_an_empty_file_is_the_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    assert load_error(path, "[]\n") == f"{path}: must be a mapping of sections (got list)"
    for empty in ("", "# nothing set yet\n"):
        path.write_text(empty)
        assert load_params(path) == Params()


def test_errors_from_set_blame_the_override(tmp_path):
    path = tmp_path / "params.yaml"
    text = "train:\n  learning_rate: 1.0e-4\n  max_timestep: 100\n"
    assert load_error(path, text, ["cche.device=cpu"]) == "--set cche.device=cpu: unknown section 'cche'; did you mean 'cache'?"
    # Set under its alias, blamed under its name by a cross-field check: still the override.
    assert load_error(path, text, ["train.timestep_start=500"]) == (
        "--set train.timestep_start=500: train.min_timestep: must be ≤ train.max_timestep (got 500 > 100)"
    )
    message = load_error(path, text, ["bucket.resolution=1" + "0" * 400])
    assert message == (
        f"--set bucket.resolution=1{'0' * 38}...: bucket.resolution: must lie between -2**63 and 2**63 - 1 "
        f"(got (1{'0' * 55}...)"
    )


def float_fields():
    """(section, parent list, key, is a list) of every float field: in every section and in a sample prompt."""
    models = [*((section, "", model) for section, model in sections().items()), ("train", "sample_prompts", SamplePrompt)]
    for section, parent, model in models:
        for name, field in model.model_fields.items():
            if field.annotation is float or float in get_args(field.annotation) or "list[float]" in str(field.annotation):
                yield section, parent, name, "list" in str(field.annotation)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_every_float_field_refuses_nan_and_inf(bad):
    fields = list(float_fields())
    assert len(fields) > 30
    for section, parent, name, is_list in fields:
        value = [1.0, bad] if is_list else bad
        raw = {section: {parent: [{"prompt": "a", name: value}]} if parent else {name: value}}
        key = f"{section}.{parent}.0.{name}" if parent else f"{section}.{name}{'.1' if is_list else ''}"
        assert error_of(raw) == f"params.yaml: {key}: Input should be a finite number (got {bad!r})"


def test_integers_must_fit_torch_and_numpy():
    assert validate_params({"train": {"seed": 2**63 - 1}}).train.seed == 2**63 - 1
    assert error_of({"train": {"seed": 2**63}}) == (
        "params.yaml: train.seed: must lie between -2**63 and 2**63 - 1 (got 9223372036854775808)"
    )
    assert error_of({"train": {"batch_size": 1e20}}) == (
        "params.yaml: train.batch_size: must lie between -2**63 and 2**63 - 1 (got 1e+20)"
    )
    assert error_of({"train": {"batch_size": 10**20}}) == (
        "params.yaml: train.batch_size: Input should be less than or equal to 4096 (got 100000000000000000000)"
    )
    assert error_of({"cache": {"batch_size": 4097}}) == "params.yaml: cache.batch_size: Input should be less than or equal to 4096 (got 4097)"
    assert error_of({"train": {"optimizer_args": {"weight_decay": [0.1, math.inf]}}}) == (
        "params.yaml: train.optimizer_args: Input should be a finite number (got {'weight_decay': [0.1, inf]})"
    )


@pytest.mark.parametrize("name", ["../../..", "", ".", "..", ".hidden", "runs/a", "runs\\a"])
def test_output_name_is_a_plain_folder_name(name):
    assert error_of({"train": {"output_name": name}}) == (
        "params.yaml: train.output_name: must be a plain folder name: not empty, no / or \\, not starting with '.' "
        f"(got {name!r})"
    )
    assert validate_params({"train": {"output_name": "my-run_2.1"}}).train.output_name == "my-run_2.1"


def test_max_nonfinite_steps_is_documented_and_shipped():
    assert Params().train.max_nonfinite_steps == 5
    assert error_of({"train": {"max_nonfinite_steps": 0}}) == (
        "params.yaml: train.max_nonfinite_steps: Input should be greater than or equal to 1 (got 0)"
    )
    assert "max_nonfinite_steps" in yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    assert "  train.max_nonfinite_steps: int = 5" in list(explain())


def test_a_wrong_type_or_an_odd_key_is_still_one_clean_line():
    # A list cannot be looked up among the presets; it must fail as a wrong value, not a TypeError.
    assert error_of({"train": {"fourier_config": ["balanced"]}}).startswith(
        "params.yaml: train.fourier_config: Input should be 'conservative', "
    )
    assert error_of({"train": {"a\nb": 1}}).startswith("params.yaml: train.a\\nb: unknown key in section 'train'")


# --- fuzzing: a mutated params file either loads or fails with one line per problem ------------------
SHIPPED_TEXT = (ROOT / "params.yaml").read_bytes()
SHIPPED = yaml.safe_load(SHIPPED_TEXT)
Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: keeps a thousand examples to seconds
KEYS = [(section, key) for section, model in sections().items() for name, field in model.model_fields.items()
        for key in field_names(name, field)]
FUZZ = settings(
    derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

extremes = st.sampled_from(
    [0, -1, 2**63, -(2**63) - 1, 10**400, 1e308, 5e-324, math.inf, -math.inf, math.nan, "", "a\nb", "../..", "no", True]
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), extremes)
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
any_key = st.one_of(st.sampled_from(KEYS), st.tuples(st.sampled_from(list(sections())), st.text(max_size=10)))


def assert_loads_or_fails_cleanly(path: Path, overrides: list[str] = ()) -> None:
    try:
        assert isinstance(load_params(path, overrides), Params)
    except KilnError as exc:
        message = str(exc)
        assert message.splitlines() == message.split("\n"), message  # no line break but the one between problems
        for line in message.split("\n"):
            assert line.startswith((f"{path}", "--set ")), line


@st.composite
def yaml_mutations(draw):
    raw = copy.deepcopy(SHIPPED)
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "section", "document"]))
    if kind == "document":
        return draw(values)
    if kind == "section":
        raw[draw(st.one_of(st.sampled_from(list(sections())), st.text(max_size=8)))] = draw(values)
    else:
        section, key = draw(any_key)
        raw.setdefault(section, {})
        if kind == "set":
            raw[section][key] = draw(values)
        else:
            raw[section].pop(key, None)
    return raw


@st.composite
def byte_mutations(draw):
    data = bytearray(SHIPPED_TEXT)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        if kind == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        else:
            del data[at:]
    return bytes(data)


@settings(FUZZ, max_examples=400)
@given(data=byte_mutations())
def test_fuzz_bytes_of_the_shipped_params(tmp_path, data):
    (tmp_path / "params.yaml").write_bytes(data)
    assert_loads_or_fails_cleanly(tmp_path / "params.yaml")


@settings(FUZZ, max_examples=500)
@given(raw=yaml_mutations())
def test_fuzz_values_of_the_shipped_params(tmp_path, raw):
    (tmp_path / "params.yaml").write_text(yaml.dump(raw, Dumper=Dumper, allow_unicode=True))
    assert_loads_or_fails_cleanly(tmp_path / "params.yaml")


@settings(FUZZ, max_examples=150)
@given(key=any_key, value=st.one_of(st.text(max_size=20), values.map(lambda v: yaml.dump(v, Dumper=Dumper).strip())))
def test_fuzz_set_overrides(tmp_path, key, value):
    (tmp_path / "params.yaml").write_bytes(SHIPPED_TEXT)
    assert_loads_or_fails_cleanly(tmp_path / "params.yaml", [f"{key[0]}.{key[1]}={value}"])


def test_shipped_params_caption_and_tag_with_no_model():
    # A project's own params never caption or tag with the random demo presets: both stages are off.
    params = load_params(ROOT / "params.yaml")
    assert (params.caption.model, params.tag.model) == (None, None)
    assert not params.caption.reg_images and not params.tag.reg_images
    text = (ROOT / "params.yaml").read_text()
    assert "tiny-blip" not in text and "tiny-wd14" not in text and "tiny-clip" not in text


def test_a_key_from_another_section_names_that_section():
    assert error_of({"train": {"resolution": 768}}) == "params.yaml: train.resolution: not a train key; did you mean bucket.resolution?"
    assert error_of({"train": {"reslution": 768}}) == (
        "params.yaml: train.reslution: unknown key in section 'train'; did you mean bucket.resolution?"
    )
    assert error_of({"caption": {"general_threshold": 0.3}}) == (
        "params.yaml: caption.general_threshold: not a caption key; did you mean tag.general_threshold?"
    )
    # The section's own closest key still wins when it is the better match.
    assert error_of({"train": {"learning_rat": 1e-4}}) == (
        "params.yaml: train.learning_rat: unknown key in section 'train'; did you mean 'learning_rate'?"
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [("AdamW8bit", "adamw8bit"), ("Prodigy", "prodigy"), ("Lion", "lion"), ("Adafactor", "adafactor"), ("AdamW", "adamw")],
)
def test_kohya_optimizer_names_in_any_case(given, expected):
    assert validate_params({"train": {"optimizer_type": given}}).train.optimizer == expected


def test_kohya_and_everydream_names_for_the_model_and_samples():
    params = validate_params({"model": {"pretrained_model_name_or_path": "/models/sd15.safetensors"}, "train": {"sample_steps": 300}})
    assert params.model.base == "/models/sd15.safetensors"
    # EveryDream2's sample_steps is the interval between samples (its meaning), not the sampler's steps.
    assert params.train.sample_every_n_steps == 300
    assert validate_params({"train": {"sample_sampler": "DPM++ 2M"}}).train.sample_sampler == "dpmsolver++"
    assert validate_params({"train": {"sample_sampler": "k_euler_a"}}).train.sample_sampler == "euler_a"
    assert validate_params({"train": {"sample_prompts": "prompts.txt"}}).train.sample_prompts == "prompts.txt"
    explained = "\n".join(explain())
    assert "train.sample_every_n_steps: int | None = None (alias: sample_steps)" in explained
    assert "`sample_steps` is accepted as an alias with EveryDream2's meaning, this interval" in " ".join(explained.split())


def test_a_bad_sample_prompt_list_blames_the_entry_not_the_file_form():
    assert error_of({"train": {"sample_prompts": [{"prompt": "a", "width": 65}]}}) == (
        "params.yaml: train.sample_prompts.0.width: Input should be a multiple of 8 (got 65)"
    )
