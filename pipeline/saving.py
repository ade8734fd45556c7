"""What a training run writes: the LoRA (kohya's keys) or the full model (a diffusers folder and an
A1111-style single file), their EMA twins, the optional diffusers-format LoRA, and the `ss_*` metadata
every file carries."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import __version__
from pipeline.lora import kohya_state_dict, save_diffusers_lora, save_kohya_lora
from pipeline.params import DIFFUSION_ONLY, FLOW_ONLY, Params, TrainParams
from pipeline.sd import SDComponents
from pipeline.single_file import save_single_file

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


@dataclass
class RunSummary:
    """What the metadata says about the model and data, beyond the params."""

    version: str = "sd1"  # sd1, sd2 or sdxl (SDComponents.version)
    prediction_type: str = "epsilon"
    train_images: int = 0
    reg_images: int = 0
    tag_frequency: dict[str, Any] = field(default_factory=dict)
    ema_decay: float | None = None  # the rate used, also when computed from ema_strength_target


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


def training_metadata(params: Params, summary: RunSummary, steps: int, epochs: int, resolved_hash: str) -> dict[str, Any]:
    """kohya-style `ss_*` training metadata (values become strings when saved)."""
    cfg = params.train
    techniques = {f"ss_{name}": str(getattr(cfg, name)) for name in technique_fields(cfg)}
    techniques["ss_caption_dropout_rate"] = str(cfg.cond_dropout)  # kohya's name for cond_dropout
    if not cfg.rectified_flow:
        techniques["ss_debiased_estimation"] = str(cfg.debiased_estimation_loss)
    techniques["ss_v_parameterization"] = str(summary.prediction_type == "v_prediction")
    if summary.ema_decay is not None:
        techniques["ss_ema_decay_rate"] = str(summary.ema_decay)
    return techniques | {
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.network_dim),
        "ss_network_alpha": str(cfg.network_alpha), "ss_network_dropout": str(cfg.network_dropout),
        "ss_network_args": {"conv_dim": cfg.conv_dim, "conv_alpha": cfg.conv_alpha} if cfg.conv_dim else {},
        "ss_base_model_version": {"sdxl": "sdxl_base_v1-0", "sd2": "sd_v2"}.get(summary.version, "sd_v1"),
        "ss_v2": str(summary.version == "sd2"),
        "ss_sd_model_name": params.model.base, "ss_resolution": str(tuple(params.bucket.resolution)),
        "ss_num_train_images": str(summary.train_images), "ss_num_reg_images": str(summary.reg_images),
        "ss_tag_frequency": summary.tag_frequency, "ss_steps": str(steps), "ss_epoch": str(epochs),
        "ss_seed": str(cfg.seed), "ss_learning_rate": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.learning_rate), "ss_optimizer": cfg.optimizer,
        "ss_lr_scheduler": cfg.lr_scheduler, "ss_prior_loss_weight": str(params.balance.prior_loss_weight),
        "ss_batch_size_per_device": str(cfg.batch_size), "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_mixed_precision": cfg.mixed_precision,
        "kiln_version": __version__, "kiln_params_sha256": resolved_hash,
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
    vae: Callable[[], Any], metadata: dict[str, Any],
) -> None:
    """The run's one-file result: a kohya LoRA, or for mode full the single file A1111 and ComfyUI load
    (original key names, with the VAE the latents came from)."""
    dtype = SAVE_DTYPES[cfg.save_precision]
    if cfg.mode == "full":
        strings = {key: value if isinstance(value, str) else json.dumps(value, sort_keys=True) for key, value in metadata.items() if not key.startswith("ss_network")}
        save_single_file(path, components.family, unet, vae(), components.text_encoders, strings, dtype)
    else:
        save_kohya_lora(path, kohya_state_dict([("lora_unet", unet), *lora_text_encoders], cfg.network_alpha, dtype), metadata)


def save_outputs(
    run_dir: Path, cfg: TrainParams, components: SDComponents, unet: Any, lora_text_encoders: list[tuple[str, Any]],
    vae: Callable[[], Any], ema: Any, metadata: dict[str, Any],
) -> Path:
    """Every output of the run under models/<output_name>/; returns the main file's path."""
    output = run_dir / f"{cfg.output_name}.safetensors"
    if cfg.mode == "full":
        save_full_model(components, unet, run_dir / "diffusers")
    save_weights(output, cfg, components, unet, lora_text_encoders, vae, metadata)
    if ema is not None:
        with ema.swapped():
            save_weights(run_dir / f"{cfg.output_name}_ema.safetensors", cfg, components, unet, lora_text_encoders, vae, metadata)
    if cfg.save_diffusers_lora and cfg.mode == "lora":
        save_diffusers_lora(
            run_dir / "diffusers_lora", unet, [encoder for _, encoder in lora_text_encoders], components.family == "sdxl",
        )
    return output
