"""Stage `train`: a LoRA trained on cached latents, under accelerate, resumable, saved in kohya's format.

Reads top to bottom: setup blocks (accelerator, model, network, optimizer, loader), then the loop.
The objective, the optimizers, the LoRA format and the checkpoints live in their own modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline import __version__
from pipeline.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.ema import EMA, decay_for_target
from pipeline.errors import KilnError
from pipeline.flow import (
    RectifiedFlowObjective,
    check_rectified_flow,
    generate_reflow_pairs,
    reflow_sample_steps,
)
from pipeline.latents import LatentStore
from pipeline.loader import make_loader
from pipeline.lora import (
    TEXT_ENCODER,
    UNET_ATTENTION,
    UNET_FEED_FORWARD,
    add_lora,
    kohya_state_dict,
    save_diffusers_lora,
    save_kohya_lora,
)
from pipeline.losses import LossSettings
from pipeline.models import find_vae
from pipeline.monitor import RunLogger, lora_block_magnitudes
from pipeline.noise import NoiseSettings
from pipeline.objective import DiffusionObjective
from pipeline.optim import build_optimizer, build_scheduler, scaled_lr
from pipeline.params import Params, TrainParams, load_params
from pipeline.samples import render, save_grid
from pipeline.sd import encode_text, load_components, set_attention
from pipeline.single_file import save_single_file
from pipeline.tables import read_table, write_table
from pipeline.timesteps import ranges as timestep_ranges
from pipeline.validation import Validator, held_out

log = logging.getLogger(__name__)


TIMESTEPS_SCHEMA = pa.schema(
    [("global_step", pa.int64()), ("image_id", pa.string()), ("is_reg", pa.bool_()), ("timestep", pa.int32())]
)


SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# What EveryDream2's load_settings_every_epoch may change mid-run (those Kiln defines).
# zero_frequency_noise_ratio is Kiln's noise_offset (its alias).
RELOADABLE = ("save_every_n_epochs", "noise_offset", "min_snr_gamma", "clip_skip")

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


@dataclass(frozen=True)
class TrainPaths:
    plan: Path
    store: Path | str
    index: Path
    models: Path  # models/; the run writes models/<output_name>/
    params_file: Path | None = None  # re-read by load_settings_every_epoch
    overrides: tuple[str, ...] = ()

    def run_dir(self, name: str) -> Path:
        return Path(self.models) / name


@dataclass
class TrainResult:
    global_step: int
    losses: list[float] = field(default_factory=list)
    output: Path | None = None
    images_per_second: float = 0.0
    validation_losses: list[float | None] = field(default_factory=list)


class Interrupted(KilnError):
    """Ctrl-C or SIGTERM: a checkpoint was saved; the message says how to resume."""


def _batch_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    # Noise and timesteps depend only on (seed, epoch, batch position), so a resumed run draws exactly
    # what the uninterrupted one would have, with no generator state to save.
    return torch.Generator().manual_seed(hash((seed, epoch, position)) & (2**63 - 1))


def _sdxl_conditioning(pooled: torch.Tensor | None, time_ids: torch.Tensor, like: torch.Tensor) -> dict[str, Any]:
    """The UNet's extra inputs for SDXL (pooled text, size/crop time ids); none for SD 1.x/2.x."""
    if pooled is None:
        return {}
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(like)}}


def full_fine_tune_groups(components: Any, cfg: TrainParams) -> list[dict[str, Any]]:
    """The UNet (or only its up_blocks), and with train_text_encoder the text encoders, as param groups."""
    unet = components.unet
    trained = unet.up_blocks if cfg.up_blocks_only else unet
    trained.requires_grad_(True)
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        for encoder in components.text_encoders:
            encoder.requires_grad_(True)
            groups.append({"params": list(encoder.parameters()), "lr": cfg.text_encoder_lr or cfg.learning_rate})
    return groups


def save_full_model(components: Any, unet: Any, folder: Path) -> None:
    """A complete diffusers folder: the base's other parts copied, the trained UNet and encoders saved."""
    import shutil

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


def reload_settings(current: TrainParams, params_file: Path, overrides: tuple[str, ...]) -> TrainParams:
    """Apply the reloadable keys that changed in params.yaml; warn about, and ignore, every other change."""
    fresh = load_params(params_file, overrides).train
    changed = sorted(name for name in TrainParams.model_fields if getattr(fresh, name) != getattr(current, name))
    applied = {}
    for name in changed:
        if name in RELOADABLE:
            log.info("load_settings_every_epoch: train.%s %r -> %r", name, getattr(current, name), getattr(fresh, name))
            applied[name] = getattr(fresh, name)
        elif name != "seed":
            log.warning("load_settings_every_epoch: train.%s changed in %s but cannot change mid-run; ignored", name, params_file)
    return current.model_copy(update=applied)


def _resolve_seed(params: Params, checkpoint_dir: Path, resume: str | None) -> Params:
    """seed -1: a resumed run keeps its checkpoint's seed; a new run draws one and logs it."""
    if params.train.seed != -1:
        return params
    source = (latest_checkpoint(checkpoint_dir) if resume == "latest" else Path(resume)) if resume else None
    if source is not None and (source / "state.json").is_file():
        seed = json.loads((source / "state.json").read_text())["loader"]["seed"]
    else:
        import secrets

        seed = secrets.randbelow(2**31)
    log.info("train.seed is -1: using seed %d", seed)
    return params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})


def lora_metadata(params: Params, summary: dict[str, Any], steps: int, epochs: int, resolved_hash: str) -> dict[str, Any]:
    """kohya-style `ss_*` training metadata (values become strings when saved)."""
    cfg = params.train
    techniques = {f"ss_{name}": str(getattr(cfg, name)) for name in TECHNIQUE_FIELDS}
    techniques["ss_caption_dropout_rate"] = str(cfg.cond_dropout)  # kohya's name for cond_dropout
    techniques["ss_debiased_estimation"] = str(cfg.debiased_estimation_loss)
    techniques["ss_v_parameterization"] = str(summary.get("prediction_type") == "v_prediction")
    if summary.get("ema_decay") is not None:
        techniques["ss_ema_decay_rate"] = str(summary["ema_decay"])  # the rate used, also when from a target
    return techniques | {
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.network_dim),
        "ss_network_alpha": str(cfg.network_alpha), "ss_network_dropout": str(cfg.network_dropout),
        "ss_network_args": {"conv_dim": cfg.conv_dim, "conv_alpha": cfg.conv_alpha} if cfg.conv_dim else {},
        "ss_base_model_version": {"sdxl": "sdxl_base_v1-0", "sd2": "sd_v2"}.get(summary.get("family", ""), "sd_v1"),
        "ss_v2": str(summary.get("family") == "sd2"),
        "ss_sd_model_name": params.model.base, "ss_resolution": str(tuple(params.bucket.resolution)),
        "ss_num_train_images": str(summary.get("train_images", 0)), "ss_num_reg_images": str(summary.get("reg_images", 0)),
        "ss_tag_frequency": summary.get("tag_frequency", {}), "ss_steps": str(steps), "ss_epoch": str(epochs),
        "ss_seed": str(cfg.seed), "ss_learning_rate": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.learning_rate), "ss_optimizer": cfg.optimizer,
        "ss_lr_scheduler": cfg.lr_scheduler, "ss_prior_loss_weight": str(params.balance.prior_loss_weight),
        "ss_batch_size_per_device": str(cfg.batch_size), "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_mixed_precision": cfg.mixed_precision,
        "kiln_version": __version__, "kiln_params_sha256": resolved_hash,
    }


def run(params: Params, paths: TrainPaths, resume: str | None = None, tag_frequency: dict[str, Any] | None = None) -> TrainResult:
    from accelerate import Accelerator

    run_dir = paths.run_dir(params.train.output_name)
    params = _resolve_seed(params, run_dir / "checkpoints", resume)
    cfg = params.train

    # --- accelerator and seeds -----------------------------------------------------------------
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    torch.manual_seed(cfg.seed)

    # --- model and network -----------------------------------------------------------------------
    components = load_components(params.model.base, config=params.model.config)
    if params.model.v_parameterization is not None:
        components.noise_scheduler.register_to_config(
            prediction_type="v_prediction" if params.model.v_parameterization else "epsilon"
        )
    log.info("model: %s (%s, %s)", params.model.base, components.family, components.prediction_type)
    unet = components.unet
    unet.requires_grad_(False)
    set_attention(unet, cfg.attn_type)
    te_networks: list[tuple[str, Any]] = []
    if cfg.mode == "full":
        groups = full_fine_tune_groups(components, cfg)
    else:
        targets = UNET_ATTENTION + (UNET_FEED_FORWARD if cfg.network_train_ff else [])
        unet_params = add_lora(unet, cfg.network_dim, cfg.network_alpha, cfg.network_dropout, targets, cfg.conv_dim, cfg.conv_alpha)
        groups = [{"params": unet_params, "lr": cfg.learning_rate}]
    if cfg.mode == "lora" and cfg.network_train_text_encoder:
        prefixes = ["lora_te"] if components.family == "sd" else ["lora_te1", "lora_te2"]
        for prefix, encoder in zip(prefixes, components.text_encoders, strict=True):
            te_params = add_lora(encoder, cfg.network_dim, cfg.network_alpha, cfg.network_dropout, TEXT_ENCODER)
            groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
            te_networks.append((prefix, encoder))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.scale_lr:
        for group in groups:
            group["lr"] = scaled_lr(group["lr"], cfg.batch_size, cfg.grad_accum)

    # --- data --------------------------------------------------------------------------------------
    plan_rows = read_table(paths.plan)
    holdout = held_out(plan_rows, cfg.validation_split, cfg.validation_folder)
    loader = make_loader(
        paths.plan, paths.store, paths.index, cfg, accelerator.process_index, accelerator.num_processes,
        logs_dir=run_dir / "logs", exclude=holdout,
    )
    if len(loader) == 0:
        raise KilnError(
            f"{paths.plan}: an epoch has no batches for this process at train.batch_size={cfg.batch_size} "
            f"(bucket_remainder={cfg.bucket_remainder}); lower batch_size or use bucket_remainder: fill"
        )
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    total_steps = cfg.max_train_steps or steps_per_epoch * cfg.max_epochs

    # --- optimizer, schedule, objective ----------------------------------------------------------
    optimizer = build_optimizer(cfg.optimizer, groups, cfg.learning_rate, dict(cfg.optimizer_args))
    scheduler = build_scheduler(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, total_steps, cfg.lr_decay_steps)

    def build_objective(cfg: TrainParams) -> DiffusionObjective:
        return DiffusionObjective.from_scheduler(
            components.noise_scheduler, loss=LossSettings.from_params(cfg, total_steps), noise=NoiseSettings.from_params(cfg),
            zero_terminal_snr=cfg.zero_terminal_snr, log_norm_timesteps=cfg.use_log_norm_timesteps,
        )

    objective = build_objective(cfg)
    flow = None
    if cfg.rectified_flow:
        check_rectified_flow(components.prediction_type)
        flow = RectifiedFlowObjective(objective.num_train_timesteps)
    if cfg.use_log_norm_timesteps and cfg.loss_type not in ("mse", "l2"):
        log.warning("train.use_log_norm_timesteps is meant for the l2 loss; loss_type is %s", cfg.loss_type)
    reg_range = cfg.reg_timestep_range
    log.info(
        "timesteps: train [%d, %d), reg [%d, %d)%s", cfg.min_timestep, cfg.max_timestep, *reg_range,
        ", log-normal" if cfg.use_log_norm_timesteps else "",
    )
    validator = None
    if holdout and not isinstance(paths.store, str):
        index = {row["cache_key"]: row for row in read_table(paths.index)}
        validator = Validator(
            [row for row in plan_rows if row["image_id"] in holdout], LatentStore(Path(paths.store)), index,
            objective, cfg.min_timestep, cfg.max_timestep, cfg.batch_size, cfg.seed,
        )
    unet, optimizer, scheduler = accelerator.prepare(unet, optimizer, scheduler)
    for encoder in components.text_encoders:
        encoder.to(accelerator.device)
    trainable = [p for group in groups for p in group["params"]]

    # --- EMA (EveryDream2) -------------------------------------------------------------------------
    ema = None
    if cfg.ema_enabled:
        decay = cfg.ema_decay_rate or decay_for_target(cfg.ema_strength_target, total_steps, cfg.ema_update_interval)
        if cfg.ema_strength_target is not None:
            log.info("ema: strength target %s over %d steps gives ema_decay_rate %.8f", cfg.ema_strength_target, total_steps, decay)
        ema = EMA(trainable, decay, cfg.ema_update_interval, cfg.ema_device if torch.cuda.is_available() else "cpu")
        if cfg.ema_resume_model:
            ema.load(Path(cfg.ema_resume_model))
    sample_ema = cfg.ema_sample_ema_model if cfg.ema_sample_ema_model is not None else ema is not None
    sample_plain = cfg.ema_sample_nonema_model if cfg.ema_sample_nonema_model is not None else ema is None

    # --- resume ----------------------------------------------------------------------------------
    global_step = 0
    checkpoint_dir = run_dir / "checkpoints"
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)  # a declared output, even before the first save
    if resume:
        source = latest_checkpoint(checkpoint_dir) if resume == "latest" else Path(resume)
        if source is None:
            raise KilnError(f"--resume latest: no checkpoint in {checkpoint_dir}")
        state = load_checkpoint(source, trainable, optimizer, scheduler)
        if state["loader"]["seed"] != cfg.seed:
            raise KilnError(f"{source}: saved with train.seed={state['loader']['seed']}, but this run has {cfg.seed}")
        global_step = state["global_step"]
        loader.load_state_dict(state["loader"])
        if ema is not None and (source / "ema.safetensors").is_file():
            ema.load(source / "ema.safetensors")
        log.info("resumed from %s at step %d", source, global_step)

    # --- interrupts: save, then tell the user how to continue ------------------------------------
    stop = {"signal": None}

    def request_stop(signum: int, frame: Any) -> None:
        stop["signal"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def validation_loss() -> float | None:
        if validator is None:
            return None
        model = accelerator.unwrap_model(unet)
        was_training = model.training
        model.eval()

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor, captions: list[str], time_ids: torch.Tensor) -> torch.Tensor:
            states, pooled = encode_text(components, captions, accelerator.device, cfg.clip_skip)
            extra = _sdxl_conditioning(pooled, time_ids, noisy)
            return model(noisy.to(accelerator.device), timesteps.to(accelerator.device), encoder_hidden_states=states, **extra).sample

        try:
            return validator.loss(predict, scaling)
        finally:
            model.train(was_training)

    vae_holder: list[Any] = []

    def vae() -> Any:
        """The VAE the latents were encoded with: loaded only to draw samples and write a single file."""
        if not vae_holder:
            if components.pipeline is not None and not params.cache.vae:
                vae_holder.append(components.pipeline.vae)
            else:
                key = "cache.vae" if params.cache.vae else "model.base"
                vae_holder.append(find_vae(params.cache.vae or params.model.base, key, params.model.config).load().vae)
        return vae_holder[0]

    def sample(name: str) -> None:
        """Draw train.sample_prompts with the current weights into samples/<name>.png and TensorBoard."""
        if not (cfg.sample_prompts and accelerator.is_main_process):
            return
        def draw(file_name: str, tag: str) -> None:
            images = render(
                components, accelerator.unwrap_model(unet), vae(), cfg.sample_prompts, accelerator.device,
                cfg.clip_skip, cfg.zero_terminal_snr,
            )
            grid = save_grid(images, run_dir / "samples" / f"{file_name}.png")
            logger.image(global_step, tag, grid)

        if sample_plain:
            draw(name, "samples")
        if sample_ema and ema is not None:
            with ema.swapped():
                draw(f"{name}-ema", "samples_ema")

    def checkpoint(name: str) -> Path:
        return save_checkpoint(
            checkpoint_dir, name, trainable, optimizer, scheduler,
            {"global_step": global_step, "loader": loader.state_dict()}, keep_last=cfg.save_last_n,
            extra_weights={"ema": ema.state_dict()} if ema is not None else None,
        )

    def velocity_of(batch: dict[str, Any]) -> Any:
        """The UNet as a velocity field under one batch's conditioning (rectified flow's ODE)."""
        states, pooled = encode_text(components, batch["captions"], accelerator.device, cfg.clip_skip)
        extra = _sdxl_conditioning(pooled, batch["time_ids"], states)
        return lambda x, t: unet(x, t, encoder_hidden_states=states, **extra).sample

    def reflow() -> None:
        """EveryDream2's reflow: pairs (noise, the model's Euler solution) from reflow_gen_batches batches,
        then reflow_train_epochs epochs on them, reflow_steps times, before the main loop."""
        steps = reflow_sample_steps(cfg.reflow_sample_steps, cfg.sample_steps)
        position = loader.state_dict()  # reflow borrows batches; the main loop starts where it would have
        peak_lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:  # at the peak lr: warmup would otherwise start it at zero
            group["lr"] = group.get("initial_lr", group["lr"])
        try:
            for iteration in range(cfg.reflow_steps):
                generator = _batch_generator(cfg.seed, -1 - iteration, 0)
                batches = (
                    (batch["latents"].to(accelerator.device) * scaling, batch) for batch in loader
                )
                pairs = generate_reflow_pairs(velocity_of, batches, cfg.reflow_gen_batches, steps, generator, flow.num_train_timesteps)
                loader.load_state_dict(position)
                losses = []
                for _ in range(cfg.reflow_train_epochs):
                    for noise, target_latents, batch in pairs:
                        noisy = flow.prepare(target_latents.to(accelerator.device), generator, noise=noise.to(accelerator.device))
                        prediction = velocity_of(batch)(noisy.noisy_latents, noisy.timesteps)
                        loss, _ = flow.loss(prediction, noisy, batch["loss_weight"].to(accelerator.device))
                        accelerator.backward(loss)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        losses.append(loss.item())
                log.info("reflow %d/%d: %d pairs of batches, mean loss %.4f", iteration + 1, cfg.reflow_steps, len(pairs), sum(losses) / max(len(losses), 1))
        finally:
            for group, lr in zip(optimizer.param_groups, peak_lrs, strict=True):
                group["lr"] = lr
            loader.load_state_dict(position)

    # --- the loop ----------------------------------------------------------------------------------
    logger = RunLogger(run_dir, accelerator.is_main_process)
    sampled: list[dict[str, Any]] = []  # train.log_timesteps
    result = TrainResult(global_step)
    scaling = components.scaling_factor
    progress = tqdm(total=total_steps, initial=global_step, desc="train", unit="step", disable=not accelerator.is_main_process)
    # Throughput is timed from the end of the first step, which pays for allocation and kernel choice.
    started, images = None, 0
    try:
        if flow is not None and cfg.reflow_steps and global_step == 0:
            reflow()
        while global_step < total_steps:
            epoch = loader.epoch
            if cfg.load_settings_every_epoch and paths.params_file and global_step > 0:
                cfg = reload_settings(cfg, paths.params_file, paths.overrides)
                objective = build_objective(cfg)
            for micro_step, batch in enumerate(loader):
                with accelerator.accumulate(unet):
                    generator = _batch_generator(cfg.seed, epoch, getattr(loader, "batch_index", micro_step))
                    latents = batch["latents"].to(accelerator.device) * scaling
                    states, pooled = encode_text(
                        components, batch["captions"], accelerator.device, cfg.clip_skip, cfg.embedding_perturbation, generator,
                    )
                    size = latents.shape[0]
                    if flow is not None:
                        noisy = flow.prepare(latents, generator)
                        timesteps = noisy.timesteps
                    else:
                        low, high = timestep_ranges(batch["is_reg"], (cfg.min_timestep, cfg.max_timestep), reg_range)
                        timesteps = objective.sample_timesteps(low, high, generator, global_step, total_steps).to(accelerator.device)
                        noisy = objective.prepare(latents, timesteps, generator)
                    extra = _sdxl_conditioning(pooled, batch["time_ids"], latents)
                    if cfg.log_timesteps:
                        sampled.extend(
                            {"global_step": global_step, "image_id": image_id, "is_reg": bool(reg), "timestep": round(t)}
                            for image_id, reg, t in zip(batch["image_ids"], batch["is_reg"], timesteps.tolist(), strict=True)
                        )
                    model_pred = unet(noisy.noisy_latents, timesteps, encoder_hidden_states=states, **extra).sample
                    masks = batch["masks"].to(latents) if cfg.masked_loss and batch["masks"] is not None else None
                    weights = batch["loss_weight"].to(accelerator.device)
                    fourier = None
                    if flow is not None:
                        loss, _ = flow.loss(model_pred, noisy, weights, masks, global_step)
                    else:
                        outcome = objective.compute_loss(model_pred, noisy, weights, masks, global_step)
                        loss, fourier = outcome.loss, outcome.fourier_component
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and cfg.clip_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.clip_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if started is None:
                    started = time.perf_counter()
                else:
                    images += size
                if accelerator.sync_gradients:
                    global_step += 1
                    if ema is not None:
                        ema.step(global_step)
                    result.losses.append(loss.item())
                    progress.update()
                    rate = images / (time.perf_counter() - started) if started and images else 0.0
                    progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", img_s=f"{rate:.1f}")
                    validating = bool(cfg.validate_every) and (global_step % cfg.validate_every == 0 or global_step == total_steps)
                    if global_step % cfg.log_step == 0 or global_step == total_steps or validating:
                        values = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "images_per_second": rate}
                        values.update({f"lr/group_{i}": lr for i, lr in enumerate(scheduler.get_last_lr())})
                        if grad_norm is not None:
                            values["grad_norm"] = float(grad_norm)
                        if fourier is not None:
                            values["fourier_component"] = fourier.mean().item()
                        if torch.cuda.is_available():
                            values["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                        values.update(lora_block_magnitudes(accelerator.unwrap_model(unet)) if cfg.mode == "lora" else {})
                        if validating:
                            result.validation_losses.append(validation_loss())
                            values["validation_loss"] = result.validation_losses[-1]
                        logger.scalars(
                            global_step, {k: v for k, v in values.items() if v is not None}, ("loss", "lr", "validation_loss", "fourier_component"),
                        )
                        logger.histogram(global_step, "timesteps", timesteps)
                    if cfg.save_every_n_steps and global_step % cfg.save_every_n_steps == 0 and accelerator.is_main_process:
                        checkpoint(f"step-{global_step:08d}")
                    if cfg.sample_every_n_steps and global_step % cfg.sample_every_n_steps == 0:
                        sample(f"step-{global_step:08d}")
                if stop["signal"] or global_step >= total_steps:
                    break
            if stop["signal"]:
                path = checkpoint("interrupted") if accelerator.is_main_process else checkpoint_dir / "interrupted"
                raise Interrupted(
                    f"{stop['signal']}: stopped at step {global_step}; saved {path}. "
                    f"Continue with `kiln train --resume latest`."
                )
            if cfg.save_every_n_epochs and (epoch + 1) % cfg.save_every_n_epochs == 0 and accelerator.is_main_process:
                checkpoint(f"epoch-{epoch + 1:04d}")
            if cfg.sample_every_n_epochs and (epoch + 1) % cfg.sample_every_n_epochs == 0:
                sample(f"epoch-{epoch + 1:04d}")
    finally:
        progress.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    # --- output ------------------------------------------------------------------------------------
    result.global_step = global_step
    result.images_per_second = images / max(time.perf_counter() - started, 1e-9) if started else 0.0
    if accelerator.is_main_process:
        summary = {
            # SD 2.x: the OpenCLIP ViT-H text encoder, 1024 wide (kohya's ss_v2).
            "family": "sd2" if components.family == "sd" and components.text_encoders[0].config.hidden_size == 1024 else components.family,
            "tag_frequency": tag_frequency or {}, "prediction_type": components.prediction_type,
            "ema_decay": ema.decay if ema is not None else None,
        }
        plan = read_table(paths.plan)
        summary["train_images"] = sum(not row["is_reg"] and row["image_id"] not in holdout for row in plan)
        summary["reg_images"] = sum(row["is_reg"] and row["repeats"] > 0 for row in plan)
        resolved = hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
        output = run_dir / f"{cfg.output_name}.safetensors"
        metadata = lora_metadata(params, summary, global_step, loader.epoch, resolved)
        def save_outputs(path: Path) -> None:
            if cfg.mode == "full":
                # The single file A1111 and ComfyUI load: original key names, the VAE the latents came from.
                save_single_file(
                    path, components.family, accelerator.unwrap_model(unet), vae(), components.text_encoders,
                    {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items() if not key.startswith("ss_network")},
                    SAVE_DTYPES[cfg.save_precision],
                )
            else:
                networks = [("lora_unet", accelerator.unwrap_model(unet)), *te_networks]
                save_kohya_lora(path, kohya_state_dict(networks, cfg.network_alpha, SAVE_DTYPES[cfg.save_precision]), metadata)

        if cfg.mode == "full":
            save_full_model(components, accelerator.unwrap_model(unet), run_dir / "diffusers")
        save_outputs(output)
        if ema is not None:
            with ema.swapped():
                save_outputs(run_dir / f"{cfg.output_name}_ema.safetensors")
        result.output = output
        if cfg.save_diffusers_lora and cfg.mode == "lora":
            save_diffusers_lora(
                run_dir / "diffusers_lora", accelerator.unwrap_model(unet), [encoder for _, encoder in te_networks],
                components.family == "sdxl",
            )
        if cfg.log_timesteps:
            write_table(sampled, TIMESTEPS_SCHEMA, run_dir / "logs" / "timesteps.parquet")
    logger.finish(
        {"steps": global_step, "final_loss": result.losses[-1] if result.losses else None,
         "best_loss": min(result.losses) if result.losses else None, "images_per_second": round(result.images_per_second, 3)}
    )
    return result
