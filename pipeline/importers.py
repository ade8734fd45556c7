"""Import a kohya-ss/sd-scripts or EveryDream2 training config as a Kiln params.yaml.

Each source option either maps to a Kiln key (`Mapped`) or is reported with the reason it does not
(`Unmapped`): nothing is dropped silently. An option the config leaves out takes its tool's default, so
the params describe the run the tool would have made, not whatever the project's params.yaml held. The
result is the project's params.yaml (comments kept) with the mapped keys replaced, validated as a whole
before it is written.
"""

from __future__ import annotations

import ast
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError as RuamelYAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from pipeline.errors import KilnError, ParamsError
from pipeline.params import Params, field_names, sections, validate_params
from pipeline.scan import parse_concept_folder
from pipeline.tables import atomic_write

OPTIMIZERS = ("adamw", "adamw8bit", "lion", "prodigy", "adafactor", "sgd", "adacoor")


@dataclass(frozen=True)
class Mapped:
    source: str
    key: str
    value: Any
    note: str = ""


@dataclass(frozen=True)
class Unmapped:
    source: str
    value: Any
    reason: str


@dataclass
class Imported:
    """What one import produced: mapped keys, unmapped options, and how to lay out the data."""

    tool: str
    file: str
    mapped: dict[str, Mapped] = field(default_factory=dict)
    unmapped: list[Unmapped] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    layout: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def set(self, source: str, key: str, value: Any, note: str = "") -> None:
        earlier = self.mapped.get(key)
        if earlier is not None and earlier.source != source:
            self.skip(earlier.source, earlier.value, f"superseded by {source} (both set {key})")
        self.mapped[key] = Mapped(source, key, value, note)

    def skip(self, source: str, value: Any, reason: str) -> None:
        self.unmapped.append(Unmapped(source, value, reason))

    def refuse(self, source: str, value: Any, reason: str) -> None:
        self.problems.append(f"{self.file}: {source} = {value!r}: {reason}")


# ---------------------------------------------------------------------------------------------------
# Reading the tools' files
# ---------------------------------------------------------------------------------------------------


def _text(path: Path) -> str:
    if not path.is_file():
        raise KilnError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise KilnError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None


def read_config(path: Path) -> dict[str, Any]:
    """A TOML or JSON config (by suffix) as a dict; a syntax error names the file and line."""
    text = _text(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KilnError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    else:
        try:  # kohya's configs are TOML: the standard library's reader from Python 3.11, tomli (the same code) before
            import tomllib
        except ImportError:
            import tomli as tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # tomllib puts the position in the message: "Invalid value (at line 2, column 5)".
            match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", str(exc))
            where = f":{match.group(1)}:{match.group(2)}" if match else ""
            message = str(exc)[: match.start()] if match else str(exc)
            raise KilnError(f"{path}{where}: not valid TOML: {message}") from None
    if not isinstance(data, dict):
        raise KilnError(f"{path}: must hold a table of options (got {type(data).__name__})")
    return data


def _referenced(name: str, beside: Path) -> Path | None:
    """A file a config names: relative to the working directory, as the tools read it, else beside it."""
    for candidate in (Path(name), beside.parent / name):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------------
# Value conversions shared by both tools
# ---------------------------------------------------------------------------------------------------


def _resolution(value: Any) -> Any:
    """kohya's "512", "768,512", 512 or [768, 512] -> 512 or "768,512" (Kiln's bucket.resolution)."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = value[0] if value[0] == value[1] else f"{value[0]},{value[1]}"
    if isinstance(value, str) and "," in value:
        width, height = (part.strip() for part in value.split(",", 1))
        return int(width) if width == height else f"{width},{height}"
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _key_value_args(items: Any) -> dict[str, Any]:
    """kohya's ["weight_decay=0.01", "betas=0.9,0.99"] -> {weight_decay: 0.01, betas: [0.9, 0.99]}.
    Values are Python literals, as kohya reads them (ast.literal_eval); a tuple becomes a list."""
    if isinstance(items, str):
        items = items.split()
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not key=value")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        parsed[key.strip()] = list(value) if isinstance(value, tuple) else value
    return parsed


def _shell(text: str) -> str:
    """Single-quoted for a POSIX shell, whatever it holds."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


# ---------------------------------------------------------------------------------------------------
# Data layout: where each kohya subset's images must go for `kiln scan`
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subset:
    """A kohya DreamBooth subset: a folder of images trained num_repeats times per epoch."""

    source: str
    image_dir: str
    num_repeats: int
    class_tokens: str | None
    is_reg: bool


def _named(subset: Subset) -> bool:
    """The subset's folder is already named `<num_repeats>_<class_tokens>`."""
    parsed = parse_concept_folder(PurePath(subset.image_dir).name)
    return parsed is not None and parsed[0] == subset.num_repeats and (
        subset.class_tokens is None or parsed[1] == subset.class_tokens.strip()
    )


def lay_out(imported: Imported, subsets: list[Subset], data_root: str) -> None:
    """Advise where each subset's folder goes. scan reads `<data_root>/{train,reg}/<repeats>_<tokens>/`;
    its RootGuard refuses a symlinked concept folder that points outside the data root, but train/ and
    reg/ themselves may be symlinks. So one symlink serves a whole kind only when its folders already
    sit in one parent under the right names; otherwise each folder is hard-linked (no copy) or copied."""
    root = data_root.rstrip("/") or "."
    linked: dict[str, str] = {}
    copied = False
    for kind in ("train", "reg"):
        group = [subset for subset in subsets if subset.is_reg == (kind == "reg")]
        parents = {str(PurePath(subset.image_dir).parent) for subset in group}
        if not group:
            continue
        if len(parents) == 1 and all(_named(subset) for subset in group):
            parent = linked[kind] = parents.pop()
            imported.layout.append(
                f"{kind}: its folders already sit in {parent} as <repeats>_<class tokens>: make {root}/{kind} a "
                f"symlink to it (move an existing {root}/{kind} aside first); any other folder in {parent} is trained too"
            )
            imported.commands.append(f"mkdir -p {_shell(root)} && ln -s {_shell(parent)} {_shell(f'{root}/{kind}')}")
            continue
        copied = True
        for subset in group:
            parsed = parse_concept_folder(PurePath(subset.image_dir).name)
            tokens = subset.class_tokens if subset.class_tokens is not None else parsed[1] if parsed else PurePath(subset.image_dir).name
            folder = f"{root}/{kind}/{subset.num_repeats}_{tokens.strip()}"
            imported.layout.append(f"{subset.source}: {subset.image_dir} -> {folder}/")
            # cp -l hard-links every image: no extra space, and the files sit inside the data root.
            imported.commands.append(
                f"mkdir -p {_shell(folder)} && cp -rl {_shell(subset.image_dir.rstrip('/') + '/.')} {_shell(folder + '/')}"
            )
    if copied:
        imported.layout.append(
            "cp -l hard-links the images (same disk only; use cp -r across disks, or mv). A symlinked concept "
            "folder is not read: scan refuses links that leave the data root; train/ and reg/ may be links."
        )
    kinds = {"reg" if subset.is_reg else "train" for subset in subsets}
    parents_of_kinds = {str(PurePath(parent).parent) for parent in linked.values()}
    if set(linked) == kinds and all(PurePath(parent).name == kind for kind, parent in linked.items()) and len(parents_of_kinds) == 1:
        # The folders already form <folder>/train (and <folder>/reg): point Kiln at that folder instead.
        folder = parents_of_kinds.pop()
        imported.set("subsets' image_dir", "scan.data_root", folder, f"the folders already form {folder}/{'{train,reg}' if len(kinds) == 2 else kinds.pop()}")
        imported.layout[:] = [f"scan.data_root is {folder}: any other folder under it is trained too"]
        imported.commands.clear()


# ---------------------------------------------------------------------------------------------------
# kohya-ss/sd-scripts
# ---------------------------------------------------------------------------------------------------

KOHYA_OPTIMIZERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "adamw": ("adamw", {}, ""),
    "adamw8bit": ("adamw8bit", {}, ""),
    "pagedadamw": ("adamw", {}, "PagedAdamW's paged state is not used"),
    "pagedadamw8bit": ("adamw8bit", {}, "PagedAdamW8bit's paged state is not used"),
    "pagedadamw32bit": ("adamw", {}, "PagedAdamW32bit's paged state is not used"),
    "lion": ("lion", {}, ""),
    "lion8bit": ("lion", {}, "Kiln's Lion keeps 32-bit state"),
    "pagedlion8bit": ("lion", {}, "Kiln's Lion keeps 32-bit state"),
    "prodigy": ("prodigy", {}, ""),
    "adafactor": ("adafactor", {}, ""),
    "sgdnesterov": ("sgd", {"momentum": 0.9, "nesterov": True}, "kohya's SGDNesterov: momentum 0.9, nesterov"),
}

# The option values kohya uses when a config leaves them out (train_util's argparse defaults). Only
# options that change the training run are listed; each is then mapped like a written one.
KOHYA_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-6, "train_batch_size": 1, "optimizer_type": "AdamW", "optimizer_args": [],
    "lr_scheduler": "constant", "lr_warmup_steps": 0, "mixed_precision": "no", "save_precision": None,
    "max_grad_norm": 1.0, "gradient_accumulation_steps": 1, "noise_offset": None, "clip_skip": None,
    "min_snr_gamma": None, "shuffle_caption": False, "keep_tokens": 0, "caption_extension": ".caption",
    "flip_aug": False, "caption_dropout_rate": 0.0, "caption_tag_dropout_rate": 0.0, "min_bucket_reso": 256,
    "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False, "prior_loss_weight": 1.0,
    "gradient_checkpointing": False, "save_every_n_steps": None, "save_every_n_epochs": None,
    "sample_every_n_steps": None, "sample_every_n_epochs": None, "sample_sampler": "ddim",
}
KOHYA_LORA_DEFAULTS: dict[str, Any] = {"network_dim": 4, "network_alpha": 1.0, "network_dropout": None}

# Options a kohya option maps to one-for-one: name -> Kiln key (and a conversion).
KOHYA_RENAMES: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "pretrained_model_name_or_path": ("model.base", str),
    "v_parameterization": ("model.v_parameterization", bool),
    "vae": ("cache.vae", str),
    "train_batch_size": ("train.batch_size", None),
    "lr_scheduler": ("train.lr_scheduler", None),
    "network_dim": ("train.network_dim", None),
    "network_alpha": ("train.network_alpha", None),
    "network_dropout": ("train.network_dropout", lambda value: value or 0.0),
    "mixed_precision": ("train.mixed_precision", None),
    "save_precision": ("train.save_precision", lambda value: value or "float"),
    "save_every_n_steps": ("train.save_every_n_steps", None),
    "save_every_n_epochs": ("train.save_every_n_epochs", None),
    "save_last_n_epochs": ("train.save_last_n", None),
    "output_name": ("train.output_name", None),
    "seed": ("train.seed", None),
    "gradient_checkpointing": ("train.gradient_checkpointing", None),
    "gradient_accumulation_steps": ("train.grad_accum", None),
    "max_grad_norm": ("train.clip_grad_norm", lambda value: value or None),  # kohya: 0 turns clipping off
    "noise_offset": ("train.noise_offset", lambda value: value or 0.0),
    "noise_offset_random_strength": ("train.noise_offset_random_strength", None),
    "adaptive_noise_scale": ("train.adaptive_noise_scale", None),
    "multires_noise_iterations": ("train.multires_noise_iterations", lambda value: value or 0),
    "multires_noise_discount": ("train.multires_noise_discount", None),
    "ip_noise_gamma": ("train.ip_noise_gamma", lambda value: value or 0.0),
    "ip_noise_gamma_random_strength": ("train.ip_noise_gamma_random_strength", None),
    "zero_terminal_snr": ("train.zero_terminal_snr", None),
    "min_timestep": ("train.min_timestep", None),
    "max_timestep": ("train.max_timestep", None),
    "loss_type": ("train.loss_type", None),
    "huber_c": ("train.huber_c", None),
    "huber_schedule": ("train.huber_schedule", None),
    "debiased_estimation_loss": ("train.debiased_estimation_loss", None),
    "masked_loss": ("train.masked_loss", None),
    "min_snr_gamma": ("train.min_snr_gamma", None),
    "clip_skip": ("train.clip_skip", lambda value: value or 1),
    "shuffle_caption": ("train.shuffle_tags", None),
    "keep_tokens": ("train.keep_tags", None),
    "caption_extension": ("scan.caption_extensions", lambda value: [value]),
    "caption_dropout_rate": ("train.cond_dropout", None),
    "caption_tag_dropout_rate": ("train.caption_tag_dropout_rate", None),
    "random_crop": ("bucket.random_crop", None),
    "resolution": ("bucket.resolution", _resolution),
    "min_bucket_reso": ("bucket.min_bucket_reso", None),
    "max_bucket_reso": ("bucket.max_bucket_reso", None),
    "bucket_reso_steps": ("bucket.bucket_reso_steps", None),
    "bucket_no_upscale": ("bucket.bucket_no_upscale", None),
    "prior_loss_weight": ("balance.prior_loss_weight", None),
    "caption_prefix": ("balance.caption_prefix", None),
    "caption_suffix": ("balance.caption_suffix", None),
    "max_data_loader_n_workers": ("train.workers", None),
    "sample_every_n_steps": ("train.sample_every_n_steps", None),
    "sample_every_n_epochs": ("train.sample_every_n_epochs", None),
    "sample_sampler": ("train.sample_sampler", None),
    "sample_prompts": ("train.sample_prompts", None),
    "cache_text_encoder_outputs": ("train.cache_text_encoder_outputs", None),
}

KOHYA_NO_EQUIVALENT: dict[str, str] = {
    "cache_latents": "Kiln always caches latents (the cache stage)",
    "cache_latents_to_disk": "Kiln always caches latents on disk (the cache stage)",
    "enable_bucket": "Kiln always buckets (the bucket stage)",
    "color_aug": "needs the pixels each step; Kiln trains cached latents (kohya refuses it with cache_latents too)",
    "face_crop_aug_range": "needs the pixels each step; Kiln trains cached latents",
    "caption_dropout_every_n_epochs": "Kiln drops captions per sample (train.cond_dropout), not whole epochs",
    "v2": "Kiln reads the architecture from model.base",
    "sdxl": "Kiln reads the architecture from model.base",
    "output_dir": "Kiln writes models/<train.output_name>/",
    "logging_dir": "Kiln logs to models/<train.output_name>/logs (TensorBoard and dvclive)",
    "log_with": "Kiln logs to TensorBoard and dvclive",
    "log_prefix": "Kiln names the logs after train.output_name",
    "save_model_as": "Kiln saves a LoRA as .safetensors, a full fine-tune as a diffusers folder",
    "save_state": "Kiln's checkpoints are always resumable (kiln train --resume)",
    "resume": "resume with `kiln train --resume`",
    "network_weights": "Kiln starts a LoRA from scratch",
    "persistent_data_loader_workers": "Kiln keeps its workers alive between epochs",
    "full_fp16": "use train.mixed_precision",
    "full_bf16": "use train.mixed_precision",
    "lowram": "no equivalent",
    "highvram": "no equivalent",
    "max_token_length": "Kiln uses the tokenizer's 77 tokens",
    "lr_scheduler_num_cycles": "Kiln's cosine_with_restarts runs one cycle",
    "lr_scheduler_power": "Kiln's polynomial schedule has power 1",
    "stop_text_encoder_training": "Kiln trains the text encoder for the whole run or not at all",
    "scale_v_pred_loss_like_noise_pred": "no equivalent",
    "v_pred_like_loss": "no equivalent",
    "mem_eff_attn": "use train.attn_type: slice (the least memory) or sdp",
    "sample_at_first": "Kiln samples at train.sample_every_n_steps / sample_every_n_epochs only",
    "in_json": "kohya's fine-tuning metadata: Kiln reads captions from .txt/.caption sidecars or EveryDream2 yaml",
    "metadata_file": "kohya's fine-tuning metadata: Kiln reads captions from .txt/.caption sidecars or EveryDream2 yaml",
    "dataset_repeats": "a folder's repeats are its name's <repeats>_ prefix (see the data layout below)",
    "num_repeats": "a folder's repeats are its name's <repeats>_ prefix (see the data layout below)",
    "training_comment": "no equivalent",
    "wandb_api_key": "Kiln logs to TensorBoard and dvclive",
    "skip_image_resolution": "no equivalent; scan.min_side rejects images by their shorter side",
    "caption_separator": "Kiln splits captions at commas",
    "keep_tokens_separator": "Kiln keeps the first train.keep_tags parts",
    "secondary_separator": "no equivalent",
    "enable_wildcard": "no equivalent",
    "cache_info": "scan keeps its own probe cache",
}

# Options a kohya dataset config may set per dataset and per subset, with their train-config names.
DATASET_OPTIONS = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                   "bucket_reso_steps", "bucket_no_upscale")
SUBSET_OPTIONS = ("shuffle_caption", "keep_tokens", "caption_extension", "flip_aug", "color_aug", "random_crop",
                  "face_crop_aug_range", "caption_dropout_rate", "caption_tag_dropout_rate",
                  "caption_dropout_every_n_epochs", "caption_prefix", "caption_suffix", "caption_separator",
                  "keep_tokens_separator", "secondary_separator", "enable_wildcard", "resize_interpolation")
SUBSET_ONLY = ("image_dir", "class_tokens", "is_reg", "num_repeats", "metadata_file", "cache_info")
# Subset options a folder's EveryDream2 local.yaml can set per folder in Kiln.
PER_FOLDER = {"flip_aug": "flip_p: 0.5", "caption_dropout_rate": "cond_dropout: <rate>", "shuffle_caption": "shuffle_tags: true"}
ARG_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}


def _flatten_kohya(config: dict[str, Any]) -> dict[str, Any]:
    """kohya reads a --config_file's sections as one namespace (train_util.read_config_from_file)."""
    flat: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[name] = value
    return flat


def _map_kohya_option(imported: Imported, name: str, value: Any, source: str, options: dict[str, Any]) -> None:
    if name in ("flip_aug",):
        imported.set(source, "train.flip_p", 0.5 if value else 0.0, "kohya flips half the samples" if value else "")
        if value:
            imported.set(source, "cache.flip_latents", True, "train.flip_p needs flipped latents")
    elif name == "xformers" or name == "sdpa":
        if value:
            imported.set(source, "train.attn_type", "xformers" if name == "xformers" else "sdp")
        else:
            imported.skip(source, value, "off: Kiln's default attention is train.attn_type: sdp")
    elif name == "save_last_n_steps":
        every = options.get("save_every_n_steps")
        if every:
            imported.set(source, "train.save_last_n", max(1, math.ceil(value / every)), f"{value} steps / save_every_n_steps {every}")
        else:
            imported.skip(source, value, "needs save_every_n_steps to count checkpoints; set train.save_last_n")
    elif name == "resize_interpolation":
        if value in ("lanczos", "area", "bicubic"):
            imported.set(source, "bucket.interpolation", value)
        else:
            imported.skip(source, value, "bucket.interpolation is lanczos, area or bicubic")
    elif name == "no_half_vae":
        if value:
            imported.set(source, "cache.vae_dtype", "float32")
        else:
            imported.skip(source, value, "off: Kiln's cache.vae_dtype auto re-encodes a NaN batch in float32")
    elif name in KOHYA_RENAMES:
        key, convert = KOHYA_RENAMES[name]
        imported.set(source, key, convert(value) if convert else value)
    elif name in KOHYA_NO_EQUIVALENT:
        imported.skip(source, value, KOHYA_NO_EQUIVALENT[name])
    else:
        imported.skip(source, value, "unknown option")


def import_kohya(config: dict[str, Any], dataset: dict[str, Any] | None, file: str, data_root: str) -> Imported:
    """Map kohya's training config (its --config_file, flattened) and dataset config (--dataset_config)."""
    imported = Imported("kohya", file)
    options = _flatten_kohya(config)
    labels = {name: name for name in options}
    network_module = options.pop("network_module", None)
    lora = network_module is not None
    defaults = {**KOHYA_DEFAULTS, **(KOHYA_LORA_DEFAULTS if lora else {})}

    # Mode, and which text encoder is trained: kohya's LoRA trains it unless network_train_unet_only.
    if lora:
        imported.set("network_module", "train.mode", "lora",
                     "" if network_module == "networks.lora" else f"Kiln trains plain LoRA; {network_module} has no equivalent")
        unet_only = bool(options.pop("network_train_unet_only", False))
        imported.set("network_train_unet_only" if "network_train_unet_only" in labels else "network_train_unet_only (kohya default)",
                     "train.network_train_text_encoder", not unet_only)
        imported.set("network_module", "train.train_text_encoder", False, "a LoRA leaves the text encoder's own weights alone")
        for item, value in _key_value_args(options.pop("network_args", [])).items():
            if item in ("conv_dim", "conv_alpha"):
                imported.set(f"network_args {item}", f"train.{item}", value)
            else:
                imported.skip(f"network_args {item}", value, "no Kiln equivalent for this network argument")
    else:
        imported.set("(no network_module)", "train.mode", "full", "a full fine-tune")
        if "train_text_encoder" in options:
            imported.set("train_text_encoder", "train.train_text_encoder", bool(options.pop("train_text_encoder")))
        else:
            imported.set("(fine_tune.py default)", "train.train_text_encoder", False,
                         "train_db.py trains it by default: set true if this was a train_db.py run")
    if options.pop("network_train_text_encoder_only", False):
        imported.skip("network_train_text_encoder_only", True, "Kiln always trains the UNet")

    # Learning rates: unet_lr and text_encoder_lr fall back to learning_rate (kohya's train_network).
    base_lr = options.pop("learning_rate", defaults["learning_rate"])
    lr_source = "learning_rate" if "learning_rate" in labels else "learning_rate (kohya default)"
    unet_lr = options.pop("unet_lr", None)
    imported.set("unet_lr" if unet_lr is not None else lr_source, "train.learning_rate", unet_lr if unet_lr is not None else base_lr)
    te_lr = options.pop("text_encoder_lr", None)
    if isinstance(te_lr, list):
        te_lr = te_lr[0] if len(set(te_lr)) == 1 else te_lr
    if isinstance(te_lr, list):
        imported.skip("text_encoder_lr", te_lr, "Kiln trains every text encoder at one rate; set train.text_encoder_lr")
    else:
        value = te_lr if te_lr is not None else base_lr
        same = unet_lr is None and te_lr is None
        imported.set("text_encoder_lr" if te_lr is not None else lr_source, "train.text_encoder_lr", None if same else value,
                     "the same as train.learning_rate" if same else "")

    # Length: kohya's max_train_epochs wins over max_train_steps; Kiln's steps win, so one is cleared.
    epochs = options.pop("max_train_epochs", None)
    steps = options.pop("max_train_steps", None)
    if epochs is not None:
        imported.set("max_train_epochs", "train.max_epochs", epochs)
        imported.set("max_train_epochs", "train.max_train_steps", None, "kohya's epochs win over steps")
        if steps is not None:
            imported.skip("max_train_steps", steps, "kohya ignores it when max_train_epochs is set")
    else:
        imported.set("max_train_steps" if steps is not None else "max_train_steps (kohya default)", "train.max_train_steps",
                     steps if steps is not None else 1600)
    warmup = options.pop("lr_warmup_steps", defaults["lr_warmup_steps"])
    total = steps if epochs is None else None
    if isinstance(warmup, float) and warmup < 1 and warmup != 0:
        if total:
            imported.set("lr_warmup_steps", "train.lr_warmup_steps", round(warmup * total), f"{warmup} of {total} steps")
        else:
            imported.skip("lr_warmup_steps", warmup, "a fraction of the total steps, unknown here; set train.lr_warmup_steps")
    else:
        imported.set("lr_warmup_steps" if "lr_warmup_steps" in labels else "lr_warmup_steps (kohya default)",
                     "train.lr_warmup_steps", int(warmup))

    # Optimizer: kohya's CamelCase names, or the older use_8bit_adam / use_lion_optimizer flags.
    name = options.pop("optimizer_type", None)
    source = "optimizer_type"
    for flag, legacy in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if options.pop(flag, False):
            if name is None:
                name, source = legacy, flag
            else:
                imported.skip(flag, True, "optimizer_type is set and wins")
    if name is None:
        name, source = defaults["optimizer_type"], "optimizer_type (kohya default)"
    args = _key_value_args(options.pop("optimizer_args", []))
    known = KOHYA_OPTIMIZERS.get(str(name).lower())
    if known is None:
        imported.refuse(source, name, f"Kiln has no such optimizer; it has {', '.join(OPTIMIZERS)}")
    else:
        optimizer, extra, note = known
        imported.set(source, "train.optimizer", optimizer, note)
        imported.set("optimizer_args" if args or "optimizer_args" in labels else "optimizer_args (kohya default)",
                     "train.optimizer_args", {**extra, **args})

    # Data: the dataset config's datasets and subsets; else train_data_dir's concept folders.
    dataset_options = set(DATASET_OPTIONS) | {"train_batch_size"} | set(SUBSET_OPTIONS) | {"dataset_repeats"}
    used: set[str] = set()
    subsets: list[Subset] = []
    if dataset is not None:
        for name in ("train_data_dir", "reg_data_dir", "in_json"):
            if name in options:
                imported.skip(name, options.pop(name), "kohya ignores it when a dataset config is given")
        subsets = _kohya_dataset(imported, dataset, options, defaults, used)
    else:
        for name, is_reg in (("train_data_dir", False), ("reg_data_dir", True)):
            folder = options.pop(name, None)
            if folder is None:
                continue
            kind = "reg" if is_reg else "train"
            imported.skip(name, folder, f"put its concept folders under {data_root}/{kind}/ (or make that folder a symlink to it)")
            imported.layout.append(f"{name}: its <repeats>_<class tokens> folders are Kiln's {data_root}/{kind}/")
            link = f"{data_root.rstrip('/')}/{kind}"
            imported.commands.append(f"mkdir -p {_shell(data_root)} && ln -s {_shell(str(folder))} {_shell(link)}")
        dataset_options = set()

    # Every remaining option, written or defaulted, mapped one by one.
    for name, value in options.items():
        if name in dataset_options and name not in used:
            if dataset is not None:
                imported.skip(name, value, "the dataset config sets it for every dataset (kohya gives it priority)")
            continue
        if name in dataset_options:
            continue
        _map_kohya_option(imported, name, value, name, options)
    for name, value in defaults.items():
        if name not in labels and name not in dataset_options and name not in (
            "learning_rate", "lr_warmup_steps", "optimizer_type", "optimizer_args"
        ):
            _map_kohya_option(imported, name, value, f"{name} (kohya default)", options)
    if subsets:
        lay_out(imported, subsets, data_root)
    return imported


def _kohya_dataset(
    imported: Imported, dataset: dict[str, Any], options: dict[str, Any], defaults: dict[str, Any], used: set[str]
) -> list[Subset]:
    """Resolve each option through kohya's layers (subset, dataset, [general], training config, default)
    and map the options Kiln sets once; report where datasets or subsets disagree."""
    general = dataset.get("general", {}) or {}
    datasets = dataset.get("datasets", []) or []
    for name in dataset:
        if name not in ("general", "datasets"):
            imported.skip(name, dataset[name], "unknown option")

    def resolve(name: str, layers: list[tuple[str, dict[str, Any]]]) -> tuple[Any, str] | None:
        for label, layer in layers:
            if name in layer:
                return layer[name], f"{label}.{name}" if label else name
        arg = ARG_NAMES.get(name, name)
        if arg in options:
            used.add(arg)
            return options[arg], arg
        if arg in defaults:
            return defaults[arg], f"{arg} (kohya default)"
        return None

    def settle(name: str, values: list[tuple[Any, str]]) -> None:
        """One Kiln value for an option: the first; any different one is reported."""
        first, first_source = values[0]
        kiln = {"batch_size": "train_batch_size"}.get(name, name)
        _map_kohya_option(imported, kiln, first, first_source, options)
        reported = {first_source}
        for value, source in values[1:]:
            if value != first and source not in reported:
                reported.add(source)
                where = f"; set it per folder in the folder's local.yaml ({PER_FOLDER[name]})" if name in PER_FOLDER else ""
                imported.skip(source, value, f"Kiln has one value for every image; {first_source} = {first!r} was taken{where}")

    subsets: list[Subset] = []
    per_dataset: dict[str, list[tuple[Any, str]]] = {}
    per_subset: dict[str, list[tuple[Any, str]]] = {}
    for number, entry in enumerate(datasets):
        dataset_layers = [(f"datasets[{number}]", entry), ("general", general)]
        for name in DATASET_OPTIONS:
            found = resolve(name, dataset_layers)
            if found is not None:
                per_dataset.setdefault(name, []).append(found)
        for other in entry:
            if other not in DATASET_OPTIONS and other not in SUBSET_OPTIONS and other not in ("subsets", "num_repeats"):
                _map_kohya_option(imported, other, entry[other], f"datasets[{number}].{other}", options)
        for index, subset in enumerate(entry.get("subsets", []) or []):
            label = f"datasets[{number}].subsets[{index}]"
            layers = [(label, subset), *dataset_layers]
            for name in SUBSET_OPTIONS:
                found = resolve(name, layers)
                if found is not None:
                    per_subset.setdefault(name, []).append(found)
            for other in subset:
                if other not in SUBSET_OPTIONS and other not in SUBSET_ONLY:
                    imported.skip(f"{label}.{other}", subset[other], "unknown option")
            if "metadata_file" in subset:
                imported.skip(f"{label}.metadata_file", subset["metadata_file"], KOHYA_NO_EQUIVALENT["metadata_file"])
            if "image_dir" not in subset:
                imported.skip(label, subset, "no image_dir: its images cannot be located")
                continue
            repeats = resolve("num_repeats", layers)
            subsets.append(
                Subset(label, str(subset["image_dir"]), int(repeats[0]) if repeats else 1, subset.get("class_tokens"), bool(subset.get("is_reg", False)))
            )
    for name in ("image_dir", "class_tokens", "is_reg", "num_repeats"):
        for label, layer in (("general", general), *((f"datasets[{n}]", d) for n, d in enumerate(datasets))):
            if name in layer and name != "num_repeats":
                imported.skip(f"{label}.{name}", layer[name], "a subset option: kohya reads it only in [[datasets.subsets]]")
    for name, values in per_dataset.items():
        if name == "enable_bucket":
            for value, source in values[:1]:
                imported.skip(source, value, KOHYA_NO_EQUIVALENT["enable_bucket"] + ("" if value else "; kohya would centre-crop every image"))
            continue
        settle(name, values)
    for name, values in per_subset.items():
        settle(name, values)
    return subsets


# ---------------------------------------------------------------------------------------------------
# EveryDream2
# ---------------------------------------------------------------------------------------------------

# EveryDream2's argparse defaults for the options that change the run (train.py).
ED2_DEFAULTS: dict[str, Any] = {
    "batch_size": 2, "cond_dropout": 0.04, "clip_grad_norm": None, "max_epochs": 300,
    "zero_frequency_noise_ratio": 0.02, "seed": 555, "log_step": 25, "sample_steps": 250,
    "project_name": "myproj", "resolution": 512, "lr_scheduler": "constant", "flip_p": 0.0, "clip_skip": 0,
    "grad_accum": 1, "gradient_checkpointing": False, "shuffle_tags": False, "keep_tags": 0,
    "disable_textenc_training": False, "amp": True, "min_snr_gamma": None,
}

ED2_RENAMES: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "resume_ckpt": ("model.base", str),
    "resolution": ("bucket.resolution", _resolution),
    "batch_size": ("train.batch_size", None),
    "lr_scheduler": ("train.lr_scheduler", None),
    "lr_warmup_steps": ("train.lr_warmup_steps", None),
    "save_every_n_epochs": ("train.save_every_n_epochs", lambda value: value or None),
    "ckpt_every_n_minutes": ("train.save_every_n_minutes", lambda value: value or None),
    "sample_steps": ("train.sample_every_n_steps", None),
    "sample_prompts": ("train.sample_prompts", None),
    "cond_dropout": ("train.cond_dropout", None),
    "seed": ("train.seed", None),
    "gradient_checkpointing": ("train.gradient_checkpointing", None),
    "grad_accum": ("train.grad_accum", None),
    "clip_grad_norm": ("train.clip_grad_norm", None),
    "zero_frequency_noise_ratio": ("train.noise_offset", lambda value: value or 0.0),
    "enable_zero_terminal_snr": ("train.zero_terminal_snr", None),
    "ema_decay_rate": ("train.ema_decay_rate", None),
    "ema_strength_target": ("train.ema_strength_target", None),
    "ema_update_interval": ("train.ema_update_interval", None),
    "ema_device": ("train.ema_device", None),
    "ema_sample_nonema_model": ("train.ema_sample_nonema_model", None),
    "ema_sample_ema_model": ("train.ema_sample_ema_model", None),
    "ema_resume_model": ("train.ema_resume_model", None),
    "min_snr_gamma": ("train.min_snr_gamma", None),
    "project_name": ("train.output_name", None),
    "clip_skip": ("train.clip_skip", lambda value: max(1, value or 0)),  # ED2: 0 and 1 are both the last layer
    "disable_textenc_training": ("train.train_text_encoder", lambda value: not value),
    "log_step": ("train.log_step", None),
    "shuffle_tags": ("train.shuffle_tags", None),
    "keep_tags": ("train.keep_tags", None),
    "scale_lr": ("train.scale_lr", None),
    "write_schedule": ("train.write_schedule", None),
    "load_settings_every_epoch": ("train.load_settings_every_epoch", None),
    "timestep_start": ("train.min_timestep", None),
    "timestep_end": ("train.max_timestep", None),
    "pyramid_noise_discount": ("train.pyramid_noise_discount", None),
    "embedding_perturbation": ("train.embedding_perturbation", lambda value: value or 0.0),
    "loss_type": ("train.loss_type", None),
    "attn_type": ("train.attn_type", None),
}

ED2_NOTES = {
    "disable_textenc_training": "EveryDream2 trains the text encoder unless disable_textenc_training; Kiln's default is off",
    "clip_skip": "EveryDream2's 0 and 1 both mean the last layer",
    "sample_steps": "EveryDream2's sample_steps is the interval between samples",
}

ED2_NO_EQUIVALENT: dict[str, str] = {
    "save_ckpts_from_n_epochs": "Kiln saves from the first period on",
    "save_ckpt_dir": "Kiln writes models/<train.output_name>/",
    "save_optimizer": "Kiln's checkpoints always hold the optimizer state",
    "logdir": "Kiln logs to models/<train.output_name>/logs",
    "run_name": "Kiln names the run train.output_name",
    "wandb": "Kiln logs to TensorBoard and dvclive",
    "gpuid": "choose the GPU with CUDA_VISIBLE_DEVICES",
    "notebook": "no equivalent",
    "lowvram": "set train.gradient_checkpointing and a small train.batch_size",
    "disable_xformers": "Kiln's attention is train.attn_type (sdp by default)",
    "disable_unet_training": "Kiln always trains the UNet",
    "rated_dataset": "no equivalent",
    "rated_dataset_target_dropout_percent": "no equivalent",
    "hf_repo_subfolder": "give model.base the folder itself",
    "ckpt_cache": "no equivalent",
}


def _ed2_amp(imported: Imported, name: str, value: Any, source: str) -> None:
    # EveryDream2's AMP is fp16 autocast with a grad scaler.
    on = not value if name == "disable_amp" else bool(value)
    imported.set(source, "train.mixed_precision", "fp16" if on else "no")


def import_everydream(
    train: dict[str, Any], optimizer: dict[str, Any] | None, validation: dict[str, Any] | None,
    file: str, optimizer_file: str, data_root: str,
) -> Imported:
    """Map EveryDream2's train.json, its optimizer.json and its validation config."""
    imported = Imported("everydream", file)
    options = dict(train)
    imported.set("(EveryDream2)", "train.mode", "full", "EveryDream2 always fine-tunes the whole model")

    folder = options.pop("data_root", None)
    if folder is not None:
        imported.skip("data_root", folder, f"its folders are Kiln's {data_root}/train/: make that folder a symlink to it")
        imported.layout.append(
            f"data_root: EveryDream2 reads any folder under {folder}; Kiln reads {data_root}/train/, which may be a "
            f"symlink to it. Kiln takes folders without a <repeats>_ prefix at 1 repeat (multiply.txt and local.yaml "
            f"still apply) and walks sub-folders, as EveryDream2 does."
        )
        imported.commands.append(f"mkdir -p {_shell(data_root)} && ln -s {_shell(str(folder))} {_shell(data_root.rstrip('/') + '/train')}")
        imported.set("data_root", "scan.require_repeats_prefix", False, "EveryDream2 folders have no <repeats>_ prefix")
        imported.set("data_root", "scan.recursive", True, "EveryDream2 walks sub-folders")
        imported.set("data_root", "scan.caption_from_filename", True, "EveryDream2 falls back to the file name")

    epochs = options.pop("max_epochs", ED2_DEFAULTS["max_epochs"])
    epochs_source = "max_epochs" if "max_epochs" in train else "max_epochs (EveryDream2 default)"
    imported.set(epochs_source, "train.max_epochs", epochs)
    imported.set(epochs_source, "train.max_train_steps", None, "EveryDream2 trains whole epochs")
    decay = options.pop("lr_decay_steps", None)
    if decay:
        imported.set("lr_decay_steps", "train.lr_decay_steps", decay)
    elif "lr_decay_steps" in train:
        imported.skip("lr_decay_steps", decay, "unset: EveryDream2 derives 1.5 x the total steps, Kiln 1.2 x for cosine")

    _ed2_optimizer(imported, options, optimizer, optimizer_file)
    if "lr_warmup_steps" in options and options["lr_warmup_steps"] is None:
        imported.skip("lr_warmup_steps", None, "EveryDream2 derives 2% of lr_decay_steps; set train.lr_warmup_steps")
        options.pop("lr_warmup_steps")
    for name in ("optimizer_config", "validation_config"):
        if name in options:
            found = (optimizer if name == "optimizer_config" else validation) is not None
            missing = ("not found here or beside train.json: pass it (kiln import everydream train.json optimizer.json)"
                       if name == "optimizer_config" else "not found here or beside train.json: its validation settings were not read")
            imported.skip(name, options.pop(name), "read: its options follow" if found else missing)
    if validation is not None:
        _ed2_validation(imported, validation)

    for name, value in options.items():
        if name in ("amp", "disable_amp"):
            _ed2_amp(imported, name, value, name)
        elif name == "flip_p":
            imported.set(name, "train.flip_p", value)
            if value:
                imported.set(name, "cache.flip_latents", True, "train.flip_p needs flipped latents")
        elif name == "save_full_precision":
            imported.set(name, "train.save_precision", "float" if value else "fp16")
        elif name in ("ema_update_interval", "ema_device") and value is None:
            imported.skip(name, value, "unset: Kiln's default applies")
        elif name in ED2_RENAMES:
            key, convert = ED2_RENAMES[name]
            imported.set(name, key, convert(value) if convert else value, ED2_NOTES.get(name, ""))
        elif name in ED2_NO_EQUIVALENT:
            imported.skip(name, value, ED2_NO_EQUIVALENT[name])
        else:
            imported.skip(name, value, "unknown option")
    for name, value in ED2_DEFAULTS.items():
        if name in train or name == "max_epochs" or ("disable_amp" in train and name == "amp"):
            continue
        if name == "amp":
            _ed2_amp(imported, name, value, "amp (EveryDream2 default)")
        else:
            key, convert = ED2_RENAMES[name]
            imported.set(f"{name} (EveryDream2 default)", key, convert(value) if convert else value, ED2_NOTES.get(name, ""))
    return imported


def _ed2_optimizer(imported: Imported, options: dict[str, Any], optimizer: dict[str, Any] | None, file: str) -> None:
    """EveryDream2's precedence: train.json's lr wins; optimizer.json's base section wins for the schedule;
    text_encoder_overrides falls back to base (optimizers.py get_final_optimizer_configs)."""
    config = optimizer or {}
    base = config.get("base") or {}
    overrides = config.get("text_encoder_overrides") or {}
    label = PurePath(file).name

    lr = options.pop("lr", None)
    if lr is not None:
        imported.set("lr", "train.learning_rate", lr)
        if base.get("lr") is not None:
            imported.skip(f"{label} base.lr", base["lr"], "train.json's lr wins (EveryDream2's precedence)")
    else:
        source = f"{label} base.lr" if base.get("lr") is not None else "lr (EveryDream2 default)"
        imported.set(source, "train.learning_rate", base.get("lr") or 1e-6)
    for name in ("lr_scheduler", "lr_warmup_steps", "lr_decay_steps"):
        if base.get(name) is not None:
            if name in options:
                imported.skip(name, options.pop(name), f"{label} base.{name} wins (EveryDream2's precedence)")
            imported.set(f"{label} base.{name}", f"train.{name}", base[name])

    name = base.get("optimizer")
    source = f"{label} base.optimizer"
    if options.pop("useadam8bit", None) is not None and name is None:
        name, source = "adamw8bit", "useadam8bit"
    if name is None:
        name, source = "adamw8bit", "optimizer (EveryDream2 default)"
    chosen = {"lion8bit": "lion"}.get(str(name).lower(), str(name).lower())
    if chosen not in OPTIMIZERS:
        imported.refuse(source, name, f"Kiln has no such optimizer; it has {', '.join(OPTIMIZERS)}")
    else:
        imported.set(source, "train.optimizer", chosen, "Kiln's Lion keeps 32-bit state" if chosen != str(name).lower() else "")
    args: dict[str, Any] = {}
    for key, value in base.items():
        if key in ("optimizer", "lr", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps") or value is None:
            continue
        if key == "epsilon" and chosen == "lion":
            imported.skip(f"{label} base.epsilon", value, "Lion takes no epsilon (EveryDream2 ignores it too)")
        else:
            args[{"epsilon": "eps"}.get(key, key)] = value
    imported.set(f"{label} base" if args else "optimizer_args", "train.optimizer_args", args,
                 "epsilon is torch's eps" if "eps" in args else "")

    te_lr = overrides.get("lr")
    scale = config.get("text_encoder_lr_scale")
    if te_lr is not None:
        imported.set(f"{label} text_encoder_overrides.lr", "train.text_encoder_lr", te_lr)
    elif scale is not None:
        rate = imported.mapped["train.learning_rate"].value * scale
        imported.set(f"{label} text_encoder_lr_scale", "train.text_encoder_lr", rate, f"{scale} x the learning rate")
    else:
        imported.set("(text_encoder_overrides.lr unset)", "train.text_encoder_lr", None, "the same as train.learning_rate")
    for key, value in overrides.items():
        if key != "lr" and value is not None and value != base.get(key):
            imported.skip(f"{label} text_encoder_overrides.{key}", value,
                          "Kiln gives the text encoder the UNet's optimizer settings; only its learning rate differs")
    for key, value in config.items():
        if key in ("base", "text_encoder_overrides", "text_encoder_lr_scale"):
            continue
        reasons = {
            "doc": "documentation only",
            "text_encoder_freezing": "Kiln trains the whole text encoder or none of it",
            "apply_grad_scaler_step_tweaks": "Kiln uses accelerate's grad scaler",
        }
        imported.skip(f"{label} {key}", value, reasons.get(key, "unknown option"))


def _ed2_validation(imported: Imported, validation: dict[str, Any]) -> None:
    on = validation.get("validate_training", True)
    for key, value in validation.items():
        source = f"validation {key}"
        if key == "val_split_proportion" and on and validation.get("val_split_mode", "automatic") == "automatic":
            imported.set(source, "train.validation_split", value)
        elif key == "val_data_root" and value and on:
            imported.skip(source, value, "move it under the data root (e.g. <data_root>/val) and set train.validation_folder: val")
        elif key == "every_n_epochs" and on:
            imported.skip(source, value, "Kiln validates every train.validate_every steps; set it")
        elif key == "validate_training" and not value:
            imported.set(source, "train.validation_split", 0.0, "validation off")
        else:
            imported.skip(source, value, "documentation only" if key == "documentation" else "no Kiln equivalent")


# ---------------------------------------------------------------------------------------------------
# Writing params.yaml
# ---------------------------------------------------------------------------------------------------


def _round_trip() -> YAML:
    loader = YAML()
    loader.preserve_quotes = True
    loader.width = 4096
    loader.indent(mapping=2, sequence=4, offset=2)

    # Kiln reads params.yaml with PyYAML (YAML 1.1), which reads `1e-06` as a string: write `1.0e-06`.
    def represent_float(representer: Any, value: float) -> Any:
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return representer.represent_scalar("tag:yaml.org,2002:float", text)

    loader.representer.add_representer(float, represent_float)
    loader.representer.add_representer(type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    return loader


def _plain(value: Any) -> Any:
    """A value ruamel writes so that PyYAML (YAML 1.1) reads it back unchanged (`no`, `on`, `1e3` and
    friends are quoted), in params.yaml's style: lists and mappings inline, a list of mappings one a line."""
    if isinstance(value, (list, tuple)):
        items = CommentedSeq(_plain(item) for item in value)
        if not any(isinstance(item, dict) for item in value):
            items.fa.set_flow_style()
        return items
    if isinstance(value, dict):
        mapping = CommentedMap((key, _plain(item)) for key, item in value.items())
        mapping.fa.set_flow_style()
        return mapping
    if isinstance(value, str) and yaml.safe_load(f"x: {value}" if value else "x: ''") != {"x": value}:
        return DoubleQuotedScalarString(value)
    return value


@dataclass
class Base:
    """The params the import starts from: the project's params.yaml (comments kept) or Kiln's defaults."""

    document: Any
    data_root: str


def load_base(path: Path) -> Base:
    if not path.is_file():
        defaults = Params().model_dump(mode="json")
        return Base(_round_trip().load(io.StringIO(yaml.safe_dump(defaults, sort_keys=False))), defaults["scan"]["data_root"])
    try:
        document = _round_trip().load(_text(path))
    except RuamelYAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise KilnError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if document is None:
        document = _round_trip().load("{}")
    if not isinstance(document, dict):
        raise KilnError(f"{path}: must be a mapping of sections (got {type(document).__name__})")
    scan = document.get("scan") if isinstance(document.get("scan"), dict) else {}
    return Base(document, str(scan.get("data_root", Params().scan.data_root)))


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise KilnError(f"{out}: already exists; pass --force to overwrite it, or --out to write elsewhere")


def render(imported: Imported, base: Base, source: str) -> str:
    """The base params with every mapped key set under its canonical name (aliases removed), validated
    as Kiln will read it; a value Kiln refuses is blamed on the option it came from."""
    if imported.problems:
        raise ParamsError("\n".join(imported.problems))
    document = base.document
    for key, mapped in imported.mapped.items():
        section_name, name = key.split(".")
        section = document.get(section_name)
        if not isinstance(section, dict):
            section = document[section_name] = _round_trip().load("{}")
        model_field = sections()[section_name].model_fields[name]
        for spelling in field_names(name, model_field):
            if spelling != name and spelling in section:
                del section[spelling]
        section[name] = _plain(mapped.value)
    stream = io.StringIO()
    _round_trip().dump(document, stream)
    text = stream.getvalue()
    try:
        validate_params(yaml.safe_load(text), source=source)
    except ParamsError as exc:
        lines = []
        for line in str(exc).splitlines():
            named = re.search(rf"\b((?:{'|'.join(sections())})\.\w+): ", line)
            mapped = imported.mapped.get(named.group(1)) if named else None
            if mapped is not None:
                line = f"{imported.file}: {mapped.source} -> {line.removeprefix(f'{source}: ')}"
            lines.append(line)
        raise ParamsError("\n".join(lines)) from None
    return text


def write_params(text: str, out: Path) -> None:
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_kohya(config_file: Path, dataset_config: Path | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The training config and the dataset config (--dataset_config, else the one the config names)."""
    config = read_config(config_file)
    named = _flatten_kohya(config).get("dataset_config")
    if dataset_config is None and named:
        dataset_config = _referenced(str(named), config_file)
        if dataset_config is None:
            raise KilnError(f"{config_file}: dataset_config = {named!r}: file not found; pass --dataset_config")
    for section in list(config.values()) + [config]:
        if isinstance(section, dict):
            section.pop("dataset_config", None)
    return config, read_config(dataset_config) if dataset_config is not None else None


def read_everydream(
    train_json: Path, optimizer_json: Path | None
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None, str]:
    """train.json, its optimizer config (given, else the one it names, when found) and its validation config."""
    train = read_config(train_json)
    if optimizer_json is None and train.get("optimizer_config"):
        optimizer_json = _referenced(str(train["optimizer_config"]), train_json)
    validation_json = _referenced(str(train["validation_config"]), train_json) if train.get("validation_config") else None
    optimizer = read_config(optimizer_json) if optimizer_json is not None else None
    validation = read_config(validation_json) if validation_json is not None else None
    return train, optimizer, validation, str(optimizer_json or "optimizer.json")


