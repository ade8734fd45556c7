"""What a training run writes: the LoRA (kohya's keys) or the full model (a diffusers folder and an
A1111-style single file), their EMA twins, the optional diffusers-format LoRA, and the metadata every file
carries: kohya's `ss_*` keys (train_network.py), Stability AI's `modelspec.*` keys (kohya's
library/sai_model_spec.py) and, on a LoRA, the `sshs_*` hashes A1111 reads instead of hashing the file.

The metadata says what trained (the plan's rows, the buckets of the latents), never what a param says
now. Its time stamps are SOURCE_DATE_EPOCH when that is set (reproducible-builds.org), so identical inputs
still give identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from pipeline import __version__
from pipeline.errors import KilnError
from pipeline.lora import kohya_state_dict, save_diffusers_lora, save_kohya_lora
from pipeline.optim import optimizer_class
from pipeline.params import DIFFUSION_ONLY, FLOW_ONLY, Params, TrainParams
from pipeline.sd import SDComponents
from pipeline.single_file import save_single_file
from pipeline.tables import honour_umask
from pipeline.weights import canonical_clip_folder

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The technique settings every LoRA and single file records as ss_<name> (kohya's names where kohya has one).
TECHNIQUE_FIELDS = (
    "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations",
    "multires_noise_discount", "pyramid_noise_discount", "ip_noise_gamma", "ip_noise_gamma_random_strength",
    "zero_terminal_snr", "min_timestep", "max_timestep", "reg_min_timestep", "reg_max_timestep",
    "use_log_norm_timesteps", "loss_type", "huber_c", "huber_schedule", "fourier_config", "fourier_weight",
    "fourier_mode", "fourier_norm", "fourier_high_freq_weight", "fourier_scales", "fourier_scale_weights",
    "fourier_warmup_steps", "fourier_adaptive_max_weight", "fourier_adaptive_min_weight", "min_snr_gamma",
    "debiased_estimation_loss", "masked_loss", "cond_dropout", "embedding_perturbation", "clip_skip",
    "ema_decay_rate", "ema_strength_target", "ema_update_interval", "rectified_flow", "reflow_steps",
    "reflow_gen_batches", "reflow_train_epochs", "reflow_sample_steps",
)

# Stability AI's model spec (its README: "This is specification version 1.0.0"), with the architecture ids
# and implementations kohya's library/sai_model_spec.py writes: `<base>/lora` (the spec's own list says
# `<base>-lora`; kohya's files, and the tools that read them, use the slash).
MODELSPEC_VERSION = "1.0.0"
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


@dataclass
class RunSummary:
    """What the metadata says about the model, the data and the run, beyond the params."""

    version: str = "sd1"  # sd1, sd2 or sdxl (SDComponents.version)
    prediction_type: str = "epsilon"
    rows: list[dict[str, Any]] = field(default_factory=list)  # the plan rows trained (held-out images left out)
    ema_decay: float | None = None  # the rate used, also when computed from ema_strength_target
    max_train_steps: int = 0  # the run's optimizer steps in all
    num_epochs: int = 0  # kohya's: ceil(max_train_steps / optimizer steps per epoch)
    num_processes: int = 1
    run_id: str = ""  # RunIdentity.id: ss_session_id derives from it
    started_at: float = 0.0  # unix times, as run_times() gives them
    finished_at: float = 0.0


def technique_fields(cfg: TrainParams) -> tuple[str, ...]:
    """The technique settings that acted in this run. The rectified-flow objective reads no diffusion-only
    key (params refuse them there) and the DDPM objective no reflow key; the fourier_* keys act only with
    loss_type fourier and the ema_* keys only with EMA on. kohya's own keys (huber_c, multires ...) are
    always written, as kohya writes them."""
    inactive = set(DIFFUSION_ONLY if cfg.rectified_flow else FLOW_ONLY)
    if cfg.loss_type != "fourier":
        inactive.update(name for name in TECHNIQUE_FIELDS if name.startswith("fourier_"))
    if not cfg.ema_enabled:
        inactive.update(name for name in TECHNIQUE_FIELDS if name.startswith("ema_"))
    return tuple(name for name in TECHNIQUE_FIELDS if name not in inactive)


def source_date_epoch() -> float | None:
    """SOURCE_DATE_EPOCH (reproducible-builds.org), the time every time stamp takes when it is set."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return None
    if not value.strip().isdigit():  # the convention: a malformed value is an error, never ignored
        raise KilnError(f"SOURCE_DATE_EPOCH={value!r}: must be a whole number of seconds since 1970-01-01 UTC")
    return float(value)


def run_times(started_at: float) -> tuple[float, float]:
    """(started, finished) for ss_training_started_at / ss_training_finished_at and modelspec.date: both
    SOURCE_DATE_EPOCH when it is set, so that identical inputs give identical bytes; else the run's real
    start (a resumed run's first start, which its checkpoints carry) and now."""
    fixed = source_date_epoch()
    return (fixed, fixed) if fixed is not None else (started_at, time.time())


def session_id(run_id: str, seed: int) -> str:
    """kohya's ss_session_id is a random 32-bit integer naming the run a file came from. Derived here from
    the run identity and the resolved seed, it names the same run after a resume, and keeps the bytes of
    identical runs identical."""
    return str(int(hashlib.sha256(f"{run_id}:{seed}".encode()).hexdigest()[:8], 16))


def base_model_metadata(base: str) -> dict[str, str]:
    """The base as kohya records it: the file or folder name, never its path (that would publish the
    user's folders), and for a single file A1111's two hashes of it: the legacy one, 8 hex digits of the
    sha256 of 64 KiB at 1 MiB (train_util.model_hash), and the sha256 of the whole file (calculate_sha256).
    A preset or hub id is not a local path and is written as given, as kohya does."""
    path = Path(base)
    if not path.exists():
        return {"ss_sd_model_name": base}
    metadata = {"ss_sd_model_name": path.resolve().name}
    if path.is_file():
        whole = hashlib.sha256()
        with open(path, "rb") as handle:
            handle.seek(0x100000)
            legacy = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
            handle.seek(0)
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                whole.update(chunk)
        metadata.update(ss_sd_model_hash=legacy, ss_new_sd_model_hash=whole.hexdigest())
    return metadata


def _samples(rows: list[dict[str, Any]]) -> int:
    """Images x repeats, as kohya counts them. A fractional repeat (EveryDream2 multiply) trains its
    fraction of the epochs, so the count is the expected samples per epoch, rounded half up."""
    return math.floor(sum(row["repeats"] for row in rows) + 0.5)


def _folder(subset: str) -> str:
    """kohya keys datasets by the folder's base name (`10_sks circle`), not its path under the data root."""
    return subset.rsplit("/", 1)[-1]


def _bucket_size(bucket: str) -> tuple[int, int]:
    width, height = bucket.split("x")
    return int(width), int(height)


def trained_resolution(rows: list[dict[str, Any]]) -> tuple[int, int] | None:
    """The largest bucket the latents were trained at (of equal areas, the squarest): the resolution whose
    area every bucket keeps to, as kohya's `--resolution` sets it. Read from the plan, so a LoRA trained at
    256 says 256 whatever bucket.resolution says now."""
    sizes = {_bucket_size(row["bucket"]) for row in rows}
    return max(sizes, key=lambda size: (size[0] * size[1], -abs(size[0] - size[1]), size[0])) if sizes else None


def tag_frequency(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per dataset folder, how often each comma-separated part of the captions
    occurs, stripped and lower-cased (train_util's set_tag_frequency, over each image's caption once).
    The captions are the plan's final ones, so the tagger's tags count where the caption template put
    them, and only there: merging the tag stage's own counts would count them twice, or count tags that
    never trained."""
    counts: dict[str, Counter[str]] = {}
    for row in rows:
        parts = (part.strip().lower() for part in (row["caption"] or "").split(","))
        counts.setdefault(_folder(row["subset"]), Counter()).update(part for part in parts if part)
    return {folder: dict(sorted(counter.items())) for folder, counter in sorted(counts.items())}


def dataset_metadata(trained: list[dict[str, Any]], cfg: TrainParams) -> dict[str, str]:
    """What kohya's DreamBooth dataset records, from the plan rows that trained."""
    per_bucket: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in trained:
        per_bucket.setdefault(_bucket_size(row["bucket"]), []).append(row)
    # kohya's bucket_info: buckets in resolution order, counts with repeats (reg images included).
    buckets = {"buckets": {
        index: {"resolution": list(size), "count": _samples(per_bucket[size])} for index, size in enumerate(sorted(per_bucket))
    }}
    sides = [side for size in per_bucket for side in size]

    def dirs(is_reg: bool) -> dict[str, dict[str, int | float]]:
        # kohya's ss_dataset_dirs / ss_reg_dataset_dirs: per folder, its repeats and image count. A
        # folder's images may differ in repeats here (EveryDream2 multiply, reg balancing): their mean.
        folders: dict[str, list[float]] = {}
        for row in trained:
            if row["is_reg"] == is_reg:
                folders.setdefault(_folder(row["subset"]), []).append(row["repeats"])
        means = {name: sum(repeats) / len(repeats) for name, repeats in folders.items()}
        return {
            name: {"n_repeats": int(mean) if mean.is_integer() else mean, "img_count": len(folders[name])}
            for name, mean in sorted(means.items())
        }

    def acts(name: str, default: Any) -> bool:  # a plan row's EveryDream2 value overrides the train param
        return any((row[name] if row[name] is not None else default) for row in trained)

    metadata = {
        "ss_num_train_images": str(_samples([row for row in trained if not row["is_reg"]])),
        "ss_num_reg_images": str(_samples([row for row in trained if row["is_reg"]])),
        "ss_dataset_dirs": json.dumps(dirs(False)), "ss_reg_dataset_dirs": json.dumps(dirs(True)),
        "ss_tag_frequency": json.dumps(tag_frequency(trained)), "ss_bucket_info": json.dumps(buckets),
        "ss_enable_bucket": "True",  # every batch comes from one aspect-ratio bucket
        "ss_flip_aug": str(acts("flip_p", cfg.flip_p)), "ss_shuffle_caption": str(acts("shuffle_tags", cfg.shuffle_tags)),
    }
    if sides:  # the bucket limits the trained buckets reached (bucket.* params are not the train stage's)
        metadata.update(ss_min_bucket_reso=str(min(sides)), ss_max_bucket_reso=str(max(sides)))
    return metadata


def optimizer_description(cfg: TrainParams) -> str:
    """kohya's ss_optimizer: the class's full path and the arguments given to it, `(key=value,...)`
    (train_util.get_optimizer), e.g. `torch.optim.adamw.AdamW(weight_decay=0.01)`."""
    optimizer = optimizer_class(cfg.optimizer)
    args = ",".join(f"{key}={value}" for key, value in cfg.optimizer_args.items())
    return f"{optimizer.__module__}.{optimizer.__name__}" + (f"({args})" if args else "")


def modelspec(cfg: TrainParams, summary: RunSummary, resolution: tuple[int, int] | None) -> dict[str, str]:
    """The `modelspec.*` keys kohya writes (library/sai_model_spec.py build_metadata): for a LoRA, or for
    mode full's checkpoint."""
    v = summary.prediction_type == "v_prediction"
    base = {"sdxl": "stable-diffusion-xl-v1-base", "sd2": "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"}
    architecture = base.get(summary.version, "stable-diffusion-v1")
    lora = cfg.mode == "lora"
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora" if lora else architecture,
        # kohya: an SD 1.x/2.x LoRA's keys are diffusers module paths; an SDXL LoRA's and a checkpoint's are SGM's.
        "modelspec.implementation": "diffusers" if lora and summary.version != "sdxl" else SGM_IMPLEMENTATION,
        "modelspec.title": cfg.output_name,
        # ISO 8601 in UTC (kohya writes local time without a zone, which would differ from machine to machine).
        "modelspec.date": datetime.fromtimestamp(int(summary.finished_at), timezone.utc).isoformat(),
        "modelspec.encoder_layer": str(cfg.clip_skip),
    }
    if resolution is not None:
        spec["modelspec.resolution"] = f"{resolution[0]}x{resolution[1]}"
    if not cfg.rectified_flow:  # a flow-trained UNet predicts x1 - x0: neither SD's v nor epsilon
        spec["modelspec.prediction_type"] = "v" if v else "epsilon"
    if (cfg.min_timestep, cfg.max_timestep) != (0, 1000):  # a timestep expert
        spec["modelspec.timestep_range"] = f"{cfg.min_timestep},{cfg.max_timestep}"
    return spec


def training_metadata(params: Params, summary: RunSummary, steps: int, epochs: int, resolved_hash: str) -> dict[str, str]:
    """The metadata of the run's file after `steps` optimizer steps, in (1-based, as kohya counts) epoch
    `epochs`: kohya's `ss_*` keys, `modelspec.*`, and Kiln's own. Every value is a string, JSON where kohya
    writes JSON."""
    cfg = params.train
    techniques = {f"ss_{name}": str(getattr(cfg, name)) for name in technique_fields(cfg)}
    techniques["ss_caption_dropout_rate"] = str(cfg.cond_dropout)  # kohya's name for cond_dropout
    if not cfg.rectified_flow:
        techniques["ss_debiased_estimation"] = str(cfg.debiased_estimation_loss)
    techniques["ss_v_parameterization"] = str(summary.prediction_type == "v_prediction")
    if summary.ema_decay is not None:
        techniques["ss_ema_decay_rate"] = str(summary.ema_decay)
    network = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.network_dim),
        "ss_network_alpha": str(cfg.network_alpha), "ss_network_dropout": str(cfg.network_dropout),
    }
    if cfg.conv_dim:  # kohya's network_args come from `key=value` strings: the values are strings
        conv_alpha = cfg.conv_alpha if cfg.conv_alpha is not None else cfg.conv_dim  # add_lora's default
        network["ss_network_args"] = json.dumps({"conv_dim": str(cfg.conv_dim), "conv_alpha": str(conv_alpha)})
    if (cfg.mode == "full" and cfg.train_text_encoder) or (cfg.mode == "lora" and cfg.network_train_text_encoder):
        network["ss_text_encoder_lr"] = str(cfg.text_encoder_lr or cfg.learning_rate)
    trained = [row for row in summary.rows if row["repeats"] > 0]  # a reg image balancing left out has none
    resolution = trained_resolution(trained)
    run = {
        "ss_session_id": session_id(summary.run_id, cfg.seed), "ss_output_name": cfg.output_name,
        "ss_training_started_at": str(summary.started_at), "ss_training_finished_at": str(summary.finished_at),
        "ss_base_model_version": {"sdxl": "sdxl_base_v1-0", "sd2": "sd_v2"}.get(summary.version, "sd_v1"),
        "ss_v2": str(summary.version == "sd2"),
        "ss_steps": str(steps), "ss_epoch": str(epochs), "ss_num_epochs": str(summary.num_epochs),
        "ss_max_train_steps": str(summary.max_train_steps), "ss_seed": str(cfg.seed),
        "ss_learning_rate": str(cfg.learning_rate), "ss_unet_lr": str(cfg.learning_rate),
        "ss_optimizer": optimizer_description(cfg), "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps), "ss_max_grad_norm": str(cfg.clip_grad_norm or 0.0),  # kohya: 0 = off
        "ss_prior_loss_weight": str(params.balance.prior_loss_weight),
        "ss_batch_size_per_device": str(cfg.batch_size), "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_total_batch_size": str(cfg.batch_size * summary.num_processes * cfg.grad_accum),
        "ss_keep_tokens": str(cfg.keep_tags), "ss_mixed_precision": cfg.mixed_precision,
        "kiln_version": __version__, "kiln_params_sha256": resolved_hash,
    }
    if resolution is not None:
        run["ss_resolution"] = str(resolution)  # kohya's str((width, height))
    return (
        techniques | network | base_model_metadata(params.model.base) | dataset_metadata(trained, cfg) | run
        | modelspec(cfg, summary, resolution)
    )


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sshs_model_hash and sshs_legacy_hash as kohya's networks/lora.py writes them for A1111 and
    sd-webui-additional-networks, which read them instead of hashing the file (train_util's
    precalculate_safetensors_hashes): the file serialized with its `ss_*` keys only, then the sha256 of
    everything after the header (the tensor bytes, as saved), and 8 hex digits of the sha256 of 64 KiB at
    1 MiB. The header is written with sorted keys, as pipeline.weights writes every file, so that the
    legacy hash does not depend on safetensors' key order when the header reaches past 1 MiB."""
    serialized = safetensors_bytes(tensors, {key: value for key, value in metadata.items() if key.startswith("ss_")})
    start = 8 + int.from_bytes(serialized[:8], "little")
    header = json.dumps(json.loads(serialized[8:start]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(header) > start - 8:  # never seen: the same content in compact JSON has the same length
        raise ValueError("the sorted safetensors header is longer than safetensors' own")
    serialized = serialized[:8] + header.ljust(start - 8) + serialized[start:]
    return {
        "sshs_model_hash": hashlib.sha256(serialized[start:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8],
    }


def save_full_model(components: SDComponents, unet: Any, folder: Path) -> None:
    """A complete diffusers folder: the base's other parts copied, the trained UNet and encoders saved."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if components.pipeline is not None:
        # A single-file base: its pipeline holds the very modules that were trained.
        components.pipeline.save_pretrained(tmp, safe_serialization=True)
    else:
        shutil.copytree(components.folder, tmp, ignore=shutil.ignore_patterns(".*"))
        shutil.rmtree(tmp / "unet")
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        for name, encoder in zip(["text_encoder", "text_encoder_2"], components.text_encoders, strict=False):
            if any(p.requires_grad for p in encoder.parameters()):
                shutil.rmtree(tmp / name)
                encoder.save_pretrained(tmp / name, safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):  # the copied ones too: the base may be transformers 5's
        if (tmp / name).is_dir():
            canonical_clip_folder(tmp / name)
    for file in tmp.rglob("*"):  # save_pretrained's safetensors are 0600 (safetensors 0.8); copies keep the base's modes
        if file.is_file():
            honour_umask(file)
    scheduler_config = tmp / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():  # model.v_parameterization may have overridden the base's
        config = json.loads(scheduler_config.read_text())
        config["prediction_type"] = components.prediction_type
        scheduler_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def save_weights(
    path: Path, cfg: TrainParams, components: SDComponents, unet: Any, lora_text_encoders: list[tuple[str, Any]],
    vae: Callable[[], Any], metadata: dict[str, str],
) -> None:
    """The run's one-file result: a kohya LoRA with the hashes of its own tensors, or for mode full the
    single file A1111 and ComfyUI load (original key names, with the VAE the latents came from)."""
    dtype = SAVE_DTYPES[cfg.save_precision]
    if cfg.mode == "full":
        checkpoint = {key: value for key, value in metadata.items() if not key.startswith("ss_network")}
        save_single_file(path, components.family, unet, vae(), components.text_encoders, checkpoint, dtype)
    else:
        state = kohya_state_dict([("lora_unet", unet), *lora_text_encoders], cfg.network_alpha, dtype)
        save_kohya_lora(path, state, metadata | addnet_hashes(state, metadata))


def save_outputs(
    run_dir: Path, cfg: TrainParams, components: SDComponents, unet: Any, lora_text_encoders: list[tuple[str, Any]],
    vae: Callable[[], Any], ema: Any, metadata: dict[str, str],
) -> Path:
    """Every output of the run under models/<output_name>/; returns the main file's path."""
    output = run_dir / f"{cfg.output_name}.safetensors"
    if cfg.mode == "full":
        save_full_model(components, unet, run_dir / "diffusers")
    save_weights(output, cfg, components, unet, lora_text_encoders, vae, metadata)
    if ema is not None:
        with ema.swapped():  # another model: titled by its file name, as kohya titles one by output_name
            twin = metadata | {"modelspec.title": f"{cfg.output_name}_ema"}
            save_weights(run_dir / f"{cfg.output_name}_ema.safetensors", cfg, components, unet, lora_text_encoders, vae, twin)
    if cfg.save_diffusers_lora and cfg.mode == "lora":
        save_diffusers_lora(
            run_dir / "diffusers_lora", unet, [encoder for _, encoder in lora_text_encoders], components.family == "sdxl",
        )
    return output
