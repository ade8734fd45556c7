"""Sample prompts from a prompt file: kohya's `.txt`, `.json` or `.toml`, EveryDream2's `.txt` or `.json`,
or a `.yaml` list.

train.sample_prompts is a list of prompts or a file's path; `load_sample_prompts` turns either into a
PromptFile. The formats, as kohya-ss/sd-scripts (library/train_util.py: `line_to_prompt_dict`, the prompt
reading in `sample_images_common`) and EveryDream2 (utils/sample_generator.py: `SampleGenerator`) read them:

- `.txt`: one prompt a line; blank lines and `#` lines are skipped. After ` --`, a line may carry kohya's
  options: `--n` negative prompt, `--w` width, `--h` height, `--d` seed, `--l` CFG scale, `--s` steps and
  `--ss` sampler. EveryDream2's sample_prompts.txt is the same file without options.
- `.json`, a list (kohya): each item a line as in `.txt`, or a mapping of kohya's keys: prompt,
  negative_prompt, width, height, seed, sample_steps, scale, sample_sampler.
- `.json`, a mapping (EveryDream2): `samples`, a list of {prompt, negative_prompt, seed, size: [w, h], cfgs},
  each drawn once at each CFG scale in `cfgs` (the sample's, else the file's); `seed`, `resolution` and
  `num_inference_steps` for every sample; `scheduler`, the sampler of every sample (EveryDream2's names).
  `generate_samples_every_n_steps` / `_epochs` come back as the PromptFile's cadence (pipeline.samples
  applies them when params.yaml sets none). `batch_size` and `show_progress_bars` change how EveryDream2
  draws, not what: they are read and have no effect. Refused, each with a one-line error: `random_caption`
  (a caption drawn from the training data, which this layer does not see), `seed: -1` (a new seed at every
  sampling), `aspect_ratio`, `generate_pretrain_samples: true` and the InvokeAI keys.
- `.toml` (kohya): the `[prompt]` table's keys are defaults for each `[[prompt.subset]]`, which holds the
  keys of kohya's JSON mapping.
- `.yaml` / `.yml`: a list of mappings with train.sample_prompts' keys, and `sampler`.

Keys a file leaves out take Kiln's defaults (seed 0, 20 steps, CFG 7, 512x512, train.sample_sampler), not
the tool's (kohya: a random seed, 30 steps, CFG 7.5; EveryDream2: the training seed, 30 steps, CFGs 7, 4 and
1.01, DDIM): a fixed seed is what makes a prompt's grids comparable from one sampling to the next. The file
is read once, when training starts (EveryDream2 re-reads it at every sampling).

Every problem is a KilnError of one line that names the file and the line (or the entry).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError, field_validator

from pipeline.errors import KilnError
from pipeline.params import (
    SAMPLERS,
    SamplePrompt,
    clipped,
    one_line,
    read_yaml,
    sampler_name,
    suggestion,
)


class FilePrompt(SamplePrompt):
    """A prompt from a prompt file, which may name its own sampler."""

    sampler: Literal[SAMPLERS] | None = None
    """This prompt's sampler (kohya's `--ss` / `sample_sampler`, EveryDream2's `scheduler`); unset,
    train.sample_sampler."""

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler_name(cls, value: Any) -> Any:
        return sampler_name(value)


@dataclass(frozen=True)
class PromptFile:
    """The prompts of train.sample_prompts, and the cadence an EveryDream2 file sets (None: the file sets none)."""

    prompts: list[SamplePrompt]
    every_n_steps: int | None = None  # EveryDream2's generate_samples_every_n_steps
    every_n_epochs: int | None = None  # EveryDream2's generate_samples_every_n_epochs
    source: str = "train.sample_prompts"  # where the prompts were read, for messages


SUFFIXES = (".txt", ".json", ".toml", ".yaml", ".yml")

# kohya's line options (line_to_prompt_dict) and its JSON/TOML keys: the SamplePrompt field each sets.
LINE_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "cfg", "s": "steps", "ss": "sampler"}
INTEGER_OPTIONS = ("w", "h", "d", "s")
KOHYA_KEYS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height", "seed": "seed",
    "sample_steps": "steps", "scale": "cfg", "sample_sampler": "sampler",
}
# What kohya reads and Kiln cannot draw: the line option and the JSON/TOML key.
KOHYA_UNSUPPORTED = {
    "cn": ("controlnet_image", "a ControlNet image"), "g": ("guidance_scale", "a distilled guidance scale"),
    "ctr": ("cfg_trunc_ratio", "CFG truncation"), "rcfg": ("renorm_cfg", "CFG renormalisation"),
    "fs": ("flow_shift", "a flow shift"),
}
KOHYA_UNSUPPORTED_KEYS = dict(KOHYA_UNSUPPORTED.values())

# EveryDream2's sample_prompts.json keys (SampleGenerator._reload_config_json), file-wide and per sample.
EVERYDREAM_KEYS = (
    "samples", "seed", "resolution", "cfgs", "num_inference_steps", "scheduler", "generate_samples_every_n_steps",
    "generate_samples_every_n_epochs", "generate_pretrain_samples", "batch_size", "show_progress_bars",
)
EVERYDREAM_SAMPLE_KEYS = ("prompt", "negative_prompt", "seed", "size", "cfgs", "random_caption", "aspect_ratio")
# EveryDream2's scheduler names (SampleGenerator._create_scheduler) as kohya's sampler names, where one
# draws with the same diffusers scheduler; its Karras-sigma (_k), SDE and ddpm schedulers have none.
EVERYDREAM_SCHEDULERS = {
    "ddim": "ddim", "pndm": "pndm", "lms": "lms", "euler": "euler", "euler_a": "euler_a", "kdpm2": "dpm_2_a",
    "dpm++": "dpmsolver++", "dpm++_2m": "dpmsolver++", "dpm++_2s": "dpmsingle",
}


def load_sample_prompts(spec: list[SamplePrompt] | str, root: Path = Path(".")) -> PromptFile:
    """train.sample_prompts as prompts: the list itself, or the prompt file at `spec` (relative to `root`,
    the project folder), read by its suffix."""
    if not isinstance(spec, str):
        return PromptFile(list(spec))
    path = Path(spec) if Path(spec).is_absolute() else root / spec
    readers: dict[str, Callable[[Path], PromptFile]] = {
        ".txt": _read_txt, ".json": _read_json, ".toml": _read_toml, ".yaml": _read_yaml_list, ".yml": _read_yaml_list,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise KilnError(
            f"{path}: train.sample_prompts: not a prompt file ({path.suffix or 'no suffix'}); use {', '.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise KilnError(f"{path}: sample prompt file not found (train.sample_prompts; a relative path is relative to the project folder)")
    loaded = reader(path)
    if not loaded.prompts:
        raise KilnError(f"{path}: no prompts in the file (it is empty, or holds only comments and blank lines)")
    return loaded


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM (Windows Notepad) is no part of the first prompt
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise KilnError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None


def _validated(values: Mapping[str, Any], where: str, names: Mapping[str, str], key_where: Mapping[str, str] | None = None) -> FilePrompt:
    """A FilePrompt from field values, or one line naming the entry and the key as the file wrote it."""
    try:
        return FilePrompt.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        where = (key_where or {}).get(field, where)
        if error["type"] == "extra_forbidden":
            valid = [name for name in FilePrompt.model_fields]
            raise KilnError(one_line(f"{where}: unknown key '{field}'{suggestion(field, valid)}")) from None
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            raise KilnError(f"{where}: {names.get(field, field)}: missing") from None
        raise KilnError(one_line(f"{where}: {names.get(field, field)}: {message} (got {clipped(repr(error['input']))})")) from None


# --- kohya: .txt lines, .json lists, .toml subsets -------------------------------------------------------


def _read_txt(path: Path) -> PromptFile:
    prompts = []
    for number, line in enumerate(_text(path).split("\n"), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(_from_line(line, f"{path}:{number}"))
    return PromptFile(prompts, source=str(path))


def _from_line(line: str, where: str) -> FilePrompt:
    """A kohya prompt line: the prompt, then ` --x value` options (line_to_prompt_dict's split on " --")."""
    prompt, *options = line.split(" --")
    values: dict[str, Any] = {"prompt": prompt.strip()}
    for option in options:
        name, _, value = option.strip().partition(" ")
        name, value = name.lower(), value.strip()  # kohya matches options in any case
        if name in KOHYA_UNSUPPORTED:
            raise KilnError(f"{where}: --{name} ({KOHYA_UNSUPPORTED[name][1]}) is not supported by Kiln's sampler")
        if name not in LINE_OPTIONS:
            raise KilnError(one_line(f"{where}: unknown option --{clipped(name)}; use {' '.join('--' + known for known in LINE_OPTIONS)}"))
        if not value:
            raise KilnError(f"{where}: --{name} needs a value")
        if LINE_OPTIONS[name] in values:
            raise KilnError(f"{where}: --{name} given twice")
        values[LINE_OPTIONS[name]] = _option_value(name, value, where)
    return _validated(values, where, {field: f"--{name}" for name, field in LINE_OPTIONS.items()})


def _option_value(name: str, value: str, where: str) -> Any:
    try:
        if name in INTEGER_OPTIONS:
            return int(value)
        if name == "l":
            return float(value)
    except ValueError:
        kind = "an integer" if name in INTEGER_OPTIONS else "a number"
        raise KilnError(one_line(f"{where}: --{name}: must be {kind} (got {clipped(repr(value))})")) from None
    return value


def _from_kohya_mapping(item: Any, where: str) -> FilePrompt:
    if not isinstance(item, dict):
        raise KilnError(one_line(f"{where}: must be a prompt line or a mapping of kohya's keys (got {clipped(repr(item))})"))
    for key in item:
        if key in KOHYA_UNSUPPORTED_KEYS:
            raise KilnError(f"{where}: {key} ({KOHYA_UNSUPPORTED_KEYS[key]}) is not supported by Kiln's sampler")
        if key not in KOHYA_KEYS:
            raise KilnError(one_line(f"{where}: unknown key '{key}'{suggestion(str(key), list(KOHYA_KEYS))}"))
    values = {KOHYA_KEYS[key]: value for key, value in item.items()}
    return _validated(values, where, {field: key for key, field in KOHYA_KEYS.items()})


def _read_json(path: Path) -> PromptFile:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise KilnError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    if isinstance(data, dict):
        return _read_everydream(path, data)
    if not isinstance(data, list):
        raise KilnError(
            f"{path}: must be a list of prompts (kohya) or a mapping with `samples` (EveryDream2), not {type(data).__name__}"
        )
    prompts = [
        _from_line(item.strip(), f"{path}: [{index}]") if isinstance(item, str) else _from_kohya_mapping(item, f"{path}: [{index}]")
        for index, item in enumerate(data)
    ]
    return PromptFile(prompts, source=str(path))


def _read_toml(path: Path) -> PromptFile:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise KilnError(f"{path}: reading a .toml prompt file needs Python 3.11 or later; use a .txt or .json one") from None
    try:
        data = tomllib.loads(_text(path))
    except tomllib.TOMLDecodeError as exc:
        # tomllib puts the position at the message's end: "Invalid value (at line 3, column 9)".
        found = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(exc))
        where = f"{path}:{found[2]}:{found[3]}" if found else str(path)
        raise KilnError(one_line(f"{where}: not valid TOML: {found[1] if found else exc}")) from None
    table = data.get("prompt")
    subsets = table.get("subset") if isinstance(table, dict) else None
    if not isinstance(subsets, list):
        raise KilnError(f"{path}: needs a [prompt] table and [[prompt.subset]] entries (kohya's prompt file)")
    defaults = {key: value for key, value in table.items() if key != "subset"}
    prompts = [_from_kohya_mapping({**defaults, **subset}, f"{path}: prompt.subset[{index}]") for index, subset in enumerate(subsets)]
    return PromptFile(prompts, source=str(path))


# --- EveryDream2: sample_prompts.json ----------------------------------------------------------------------


def _read_everydream(path: Path, data: dict[str, Any]) -> PromptFile:
    for key in data:
        if "invokeai" in str(key):
            raise KilnError(one_line(f"{path}: {key}: InvokeAI samples are not supported"))
        if key not in EVERYDREAM_KEYS:
            raise KilnError(one_line(f"{path}: unknown key '{key}'{suggestion(str(key), list(EVERYDREAM_KEYS))}"))
    if data.get("generate_pretrain_samples"):
        raise KilnError(f"{path}: generate_pretrain_samples: Kiln draws no samples before the first step; remove it or set it to false")
    samples = data.get("samples")
    if not isinstance(samples, list) or not samples:
        raise KilnError(
            f"{path}: samples: no prompts (EveryDream2 then draws random training captions, which Kiln does not); "
            "list {\"prompt\": ...} entries"
        )
    defaults: dict[str, Any] = {}
    if "num_inference_steps" in data:
        defaults["steps"] = data["num_inference_steps"]
    if "scheduler" in data:
        defaults["sampler"] = _everydream_scheduler(path, data["scheduler"])
    if "resolution" in data:
        defaults["width"] = defaults["height"] = data["resolution"]
    prompts: list[SamplePrompt] = []
    for index, sample in enumerate(samples):
        prompts.extend(_everydream_sample(sample, f"{path}: samples[{index}]", data, defaults))
    return PromptFile(
        prompts, _cadence(path, data, "generate_samples_every_n_steps"), _cadence(path, data, "generate_samples_every_n_epochs"), str(path),
    )


def _everydream_sample(sample: Any, where: str, data: dict[str, Any], defaults: dict[str, Any]) -> list[FilePrompt]:
    """One EveryDream2 sample: one prompt per CFG scale."""
    if not isinstance(sample, dict):
        raise KilnError(one_line(f"{where}: must be a mapping such as {{\"prompt\": \"...\"}} (got {clipped(repr(sample))})"))
    for key in sample:
        if key not in EVERYDREAM_SAMPLE_KEYS:
            raise KilnError(one_line(f"{where}: unknown key '{key}'{suggestion(str(key), list(EVERYDREAM_SAMPLE_KEYS))}"))
    if sample.get("random_caption"):
        raise KilnError(
            f"{where}: random_caption draws a caption from the training data at random, which Kiln's sampler cannot; "
            "write a fixed prompt instead"
        )
    if "aspect_ratio" in sample:
        raise KilnError(f"{where}: aspect_ratio is not supported; give size: [width, height]")
    values = {**defaults, **{key: sample[key] for key in ("prompt", "negative_prompt") if key in sample}}
    names = {"steps": "num_inference_steps", "sampler": "scheduler", "width": "resolution", "height": "resolution", "cfg": "cfgs"}
    seed = sample.get("seed", data.get("seed"))
    if seed == -1:
        raise KilnError(
            f"{where}: seed -1 (a new random seed at every sampling) is not supported: a fixed seed keeps the grids "
            "comparable; give a number"
        )
    if seed is not None:
        values["seed"] = seed
    if "size" in sample:
        size = sample["size"]
        if not isinstance(size, list) or len(size) != 2:
            raise KilnError(one_line(f"{where}: size: must be [width, height] (got {clipped(repr(size))})"))
        values["width"], values["height"] = size
        names.update(width="size", height="size")
    cfgs = sample.get("cfgs", data.get("cfgs"))
    if cfgs is None:
        return [_validated(values, where, names)]
    if not isinstance(cfgs, list) or not cfgs:
        raise KilnError(one_line(f"{where}: cfgs: must be a list of CFG scales, such as [7, 4] (got {clipped(repr(cfgs))})"))
    return [_validated({**values, "cfg": cfg}, where, names) for cfg in cfgs]


def _everydream_scheduler(path: Path, name: Any) -> str:
    if name not in EVERYDREAM_SCHEDULERS:
        raise KilnError(one_line(
            f"{path}: scheduler: {clipped(repr(name))} has no Kiln sampler; use one of {', '.join(EVERYDREAM_SCHEDULERS)}, "
            "or drop the key and set train.sample_sampler"
        ))
    return EVERYDREAM_SCHEDULERS[name]


def _cadence(path: Path, data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise KilnError(one_line(f"{path}: {key}: must be a whole number of at least 1 (got {clipped(repr(value))})"))
    return value


# --- YAML: a list of SamplePrompt mappings -----------------------------------------------------------------


def _read_yaml_list(path: Path) -> PromptFile:
    data, lines = read_yaml(path)
    if data is None:
        return PromptFile([], source=str(path))
    if not isinstance(data, list):
        raise KilnError(f"{path}: must be a list of prompts, each a mapping such as {{prompt: ..., seed: 1}} (not {type(data).__name__})")
    prompts = []
    for index, item in enumerate(data):
        where = f"{path}:{lines.get((str(index),), '?')}"
        if not isinstance(item, dict):
            raise KilnError(one_line(f"{where}: must be a mapping such as {{prompt: ..., seed: 1}} (got {clipped(repr(item))})"))
        key_where = {str(key): f"{path}:{lines[(str(index), str(key))]}" for key in item if (str(index), str(key)) in lines}
        prompts.append(_validated(item, where, {}, key_where))
    return PromptFile(prompts, source=str(path))
