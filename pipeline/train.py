"""Stage `train`: a LoRA or a full fine-tune trained on cached latents, under accelerate, resumable.

Read top to bottom: `run` is labelled setup blocks (seed, accelerator, model and network, data, optimizer,
objective and step, validation, EMA, checkpoints, logging), then `fit`, the loop, then the outputs.
The step (pipeline.step), the objectives (objective, flow), saving, checkpoints, samples, validation and
the interrupt handling live in their own modules; this one wires them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.cadence import due, due_or_last
from pipeline.checkpoints import Checkpointer, RunIdentity, resolve_seed, resume_source
from pipeline.ema import EMA, decay_for_target
from pipeline.errors import KilnError
from pipeline.flow import RectifiedFlowObjective, check_rectified_flow, reflow
from pipeline.interrupts import StopRequest, stop_on_signals
from pipeline.latents import LatentStore, is_remote
from pipeline.loader import make_loader, trained_rows
from pipeline.lora import TEXT_ENCODER, UNET_ATTENTION, UNET_FEED_FORWARD, add_lora
from pipeline.losses import LossSettings
from pipeline.monitor import RunLogger, Throughput, draw_loss_curve, lora_block_magnitudes, write_timesteps
from pipeline.noise import NoiseSettings
from pipeline.objective import DiffusionObjective, Objective
from pipeline.optim import build_optimizer, build_scheduler, check_optimizer_args, optimizer_class, scaled_lr
from pipeline.params import Params, TrainParams, declared_values, load_params
from pipeline.samples import Sampler, check_sample_prompts
from pipeline.saving import RunSummary, run_times, save_outputs, training_metadata
from pipeline.sd import SDComponents, TextEmbeddingCache, load_components, set_attention
from pipeline.step import StepOutput, TrainingStep
from pipeline.tables import read_table, require, write_json
from pipeline.validation import Validator, held_out

log = logging.getLogger(__name__)

# The params the train stage's outputs depend on (the metadata records balance.prior_loss_weight; samples
# and the single file use cache.vae's VAE; the trained resolution comes from the plan, not bucket.resolution). dvc.yaml declares exactly
# these (tests/test_dvc_yaml.py checks it), and the run's params hash covers exactly these.
PARAMS = ("model", "train", "balance.prior_loss_weight", "cache.vae")

# Declared keys that change what is logged, drawn or written, but not the trained weights: a run with
# only these changed is the same run, and resumes its checkpoints.
NOT_WEIGHTS = frozenset({
    "train.log_step", "train.log_timesteps", "train.save_every_n_steps", "train.save_every_n_epochs", "train.save_every_n_minutes",
    "train.sample_sampler",
    "train.save_last_n", "train.sample_prompts", "train.sample_every_n_steps", "train.sample_every_n_epochs",
    "train.validate_every", "train.workers", "train.write_schedule", "train.save_precision",
    "train.save_diffusers_lora", "train.output_name", "train.ema_sample_ema_model", "train.ema_sample_nonema_model",
    "balance.prior_loss_weight", "cache.vae",
})

# What EveryDream2's load_settings_every_epoch may change mid-run (those Kiln defines).
# zero_frequency_noise_ratio is Kiln's noise_offset (its alias).
RELOADABLE = ("save_every_n_epochs", "noise_offset", "min_snr_gamma", "clip_skip")


@dataclass(frozen=True)
class TrainPaths:
    plan: Path
    store: Path | str  # a folder, or a shard URL prefix (pipeline.latents.is_remote)
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
    images_per_second: float = 0.0  # over training steps only (monitor.Throughput)
    validation_losses: list[float | None] = field(default_factory=list)
    nonfinite_steps: int = 0  # skipped for a NaN or inf loss or gradient (train.max_nonfinite_steps)


class Interrupted(KilnError):
    """Ctrl-C or SIGTERM: a checkpoint was saved; the message says how to resume."""


@dataclass
class Network:
    """What trains: optimizer param groups, and the text encoders that carry LoRA (with kohya's prefix)."""

    groups: list[dict[str, Any]]
    lora_text_encoders: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [param for group in self.groups for param in group["params"]]


@dataclass
class Training:
    """Everything the loop touches, built by `run`'s setup blocks (no state hides in closures)."""

    cfg: TrainParams
    paths: TrainPaths
    accelerator: Any
    components: SDComponents
    step: TrainingStep
    optimizer: Any
    scheduler: Any
    loader: Any
    trainable: list[torch.nn.Parameter]
    total_steps: int
    validator: Validator | None
    ema: EMA | None
    checkpointer: Checkpointer
    sampler: Sampler
    logger: RunLogger
    progress: Any
    throughput: Throughput = field(default_factory=Throughput)
    timesteps_log: list[dict[str, Any]] = field(default_factory=list)  # train.log_timesteps
    validation_points: list[tuple[int, float]] = field(default_factory=list)  # (global_step, validation loss)
    nonfinite_in_a_row: int = 0  # steps skipped for a NaN or inf loss or gradient, since the last good one
    last_save: float = field(default_factory=lambda: time.monotonic())  # for train.save_every_n_minutes


def run_identity(params: Params, plan: Path) -> RunIdentity:
    """What determines this run's weights: the declared params (but NOT_WEIGHTS), the plan's bytes and
    Kiln's code. Taken from the params as declared, so `seed: -1` is itself part of the identity."""
    values: dict[str, Any] = {}
    for name, value in declared_values(params, PARAMS).items():
        values.update({f"{name}.{key}": item for key, item in value.items()} if isinstance(value, dict) else {name: value})
    values = {key: value for key, value in values.items() if key not in NOT_WEIGHTS}
    values["plan"] = hashlib.sha256(Path(plan).read_bytes()).hexdigest()
    code = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        code.update(source.name.encode() + source.read_bytes())
    values["code"] = code.hexdigest()
    return RunIdentity(values)


def check_inputs(paths: TrainPaths) -> None:
    """The plan and the latent index exist, or one line naming the stage that writes the missing one.
    The loader reads a local store's own index.parquet, and a streamed store's from paths.index."""
    index = paths.index if is_remote(paths.store) else Path(paths.store) / "index.parquet"
    for table, stage in ((Path(paths.plan), "balance"), (Path(index), "cache")):
        require(table, stage)


def load_model(params: Params) -> SDComponents:
    """The base model's parts, with model.v_parameterization overriding its prediction type."""
    components = load_components(params.model.base, config=params.model.config)
    if params.model.v_parameterization is not None:
        components.noise_scheduler.register_to_config(
            prediction_type="v_prediction" if params.model.v_parameterization else "epsilon"
        )
    log.info("model: %s (%s, %s)", params.model.base, components.version, components.prediction_type)
    return components


def full_fine_tune_groups(components: SDComponents, cfg: TrainParams) -> list[dict[str, Any]]:
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


def build_network(components: SDComponents, cfg: TrainParams) -> Network:
    """mode full: the model's own weights; mode lora: LoRA (and LoCon) on the UNet, optionally the text encoders."""
    if cfg.mode == "full":
        network = Network(full_fine_tune_groups(components, cfg))
    else:
        targets = UNET_ATTENTION + (UNET_FEED_FORWARD if cfg.network_train_ff else [])
        unet_params = add_lora(
            components.unet, cfg.network_dim, cfg.network_alpha, cfg.network_dropout, targets, cfg.conv_dim, cfg.conv_alpha,
        )
        network = Network([{"params": unet_params, "lr": cfg.learning_rate}])
    if cfg.mode == "lora" and cfg.network_train_text_encoder:
        prefixes = ["lora_te"] if components.family == "sd" else ["lora_te1", "lora_te2"]
        for prefix, encoder in zip(prefixes, components.text_encoders, strict=True):
            te_params = add_lora(encoder, cfg.network_dim, cfg.network_alpha, cfg.network_dropout, TEXT_ENCODER)
            network.groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
            network.lora_text_encoders.append((prefix, encoder))
    if cfg.scale_lr:
        for group in network.groups:
            group["lr"] = scaled_lr(group["lr"], cfg.batch_size, cfg.grad_accum)
    return network


def set_tf32(allow: bool) -> None:
    """train.allow_tf32: TF32 tensor cores for float32 matmuls and cuDNN convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def compile_blocks(unet: Any) -> int:
    """Regional compilation (train.compile_unet): each transformer and ResNet block's forward compiled in
    place (nn.Module.compile keeps the module and its state_dict keys), rather than the whole UNet, so
    blocks of one shape share their compiled code and the compile stays short. Returns the block count."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    blocks = [module for module in unet.modules() if isinstance(module, (BasicTransformerBlock, ResnetBlock2D))]
    for block in blocks:
        block.compile()
    return len(blocks)


def frozen_weight_dtype(cfg: TrainParams) -> torch.dtype | None:
    """The dtype a LoRA's frozen base (UNet and text encoders) is kept in: under mixed precision, the
    compute dtype, as kohya (`weight_dtype`) and the plain diffusers loop keep it. Autocast would cast the
    float32 weights to it at every use anyway: kept so, they take half the memory and no cast kernels run.
    The LoRA weights stay float32. A full fine-tune keeps float32 everywhere: its frozen parts are saved."""
    if cfg.mode != "lora" or cfg.mixed_precision == "no":
        return None
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16


def cast_frozen(modules: list[Any], dtype: torch.dtype) -> int:
    """Every parameter that does not train, in `dtype`; returns how many were cast."""
    cast = 0
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad and param.dtype != dtype:
                param.data = param.data.to(dtype)
                cast += 1
    return cast


def build_objective(cfg: TrainParams, components: SDComponents, total_steps: int) -> Objective:
    """The DDPM objective on the base's schedule, or rectified flow; both own the train and reg timestep ranges."""
    train_range, reg_range = (cfg.min_timestep, cfg.max_timestep), cfg.reg_timestep_range
    if cfg.rectified_flow:
        check_rectified_flow(components.prediction_type)
        return RectifiedFlowObjective(
            components.noise_scheduler.config.num_train_timesteps, train_range, reg_range, NoiseSettings.from_params(cfg),
        )
    return DiffusionObjective.from_scheduler(
        components.noise_scheduler, loss=LossSettings.from_params(cfg, total_steps), noise=NoiseSettings.from_params(cfg),
        zero_terminal_snr=cfg.zero_terminal_snr, log_norm_timesteps=cfg.use_log_norm_timesteps,
        train_range=train_range, reg_range=reg_range, max_train_steps=total_steps,
    )


def build_ema(cfg: TrainParams, trainable: list[torch.nn.Parameter], total_steps: int) -> EMA | None:
    """EveryDream2's EMA: a decay rate, or one computed from ema_strength_target over the run."""
    if not cfg.ema_enabled:
        return None
    decay = cfg.ema_decay_rate or decay_for_target(cfg.ema_strength_target, total_steps, cfg.ema_update_interval)
    if cfg.ema_strength_target is not None:
        log.info("ema: strength target %s over %d steps gives ema_decay_rate %.8f", cfg.ema_strength_target, total_steps, decay)
    ema = EMA(trainable, decay, cfg.ema_update_interval, cfg.ema_device if torch.cuda.is_available() else "cpu")
    if cfg.ema_resume_model:
        ema.load(Path(cfg.ema_resume_model))
    return ema


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


def run(params: Params, paths: TrainPaths, resume: str | None = None) -> TrainResult:
    from accelerate import Accelerator

    # --- inputs, run identity, resume source and seed: a run resumes only its own checkpoints ---------
    # All checked before the model loads (the slow part), and before anything is written.
    started_at = time.time()  # the metadata's ss_training_started_at; a resumed run keeps its first (checkpoints)
    run_dir = paths.run_dir(params.train.output_name)
    check_inputs(paths)
    # optimizer_args the optimizer would refuse at its first use.
    check_optimizer_args(optimizer_class(params.train.optimizer), params.train.optimizer_args)
    check_sample_prompts(params.train)  # a prompt file's problems, and a sampler's missing library
    identity = run_identity(params, paths.plan)
    source = resume_source(run_dir / "checkpoints", resume, identity)
    seed = resolve_seed(params.train.seed, source)
    params = params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})
    cfg = params.train

    # --- accelerator -----------------------------------------------------------------------------
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    torch.manual_seed(cfg.seed)
    if accelerator.device.type == "cuda":
        set_tf32(cfg.allow_tf32)

    # --- model and network -----------------------------------------------------------------------
    components = load_model(params)
    components.unet.requires_grad_(False)
    set_attention(components.unet, cfg.attn_type)
    network = build_network(components, cfg)
    weight_dtype = frozen_weight_dtype(cfg)
    if weight_dtype is not None:
        cast_frozen([components.unet, *components.text_encoders], weight_dtype)
    if cfg.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
    if cfg.compile_unet:
        log.info("compile_unet: %d blocks compile on their first step", compile_blocks(components.unet))

    # --- data: the plan is read once, here --------------------------------------------------------
    plan = read_table(paths.plan, "balance")
    holdout = held_out(plan, cfg.validation_split, cfg.validation_folder)
    loader = make_loader(
        plan, paths.store, paths.index, cfg, accelerator.process_index, accelerator.num_processes,
        logs_dir=run_dir / "logs", exclude=holdout,
    )
    if len(loader) == 0:
        raise KilnError(
            f"{paths.plan}: an epoch has no batches for this process at train.batch_size={cfg.batch_size} "
            f"(bucket_remainder={cfg.bucket_remainder}); lower batch_size or use bucket_remainder: fill"
        )
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    total_steps = cfg.max_train_steps or steps_per_epoch * cfg.max_epochs

    # --- optimizer and schedule ------------------------------------------------------------------
    optimizer = build_optimizer(cfg.optimizer, network.groups, cfg.learning_rate, dict(cfg.optimizer_args))
    scheduler = build_scheduler(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, total_steps, cfg.lr_decay_steps)
    unet, optimizer, scheduler = accelerator.prepare(components.unet, optimizer, scheduler)
    for encoder in components.text_encoders:
        encoder.to(accelerator.device)

    # --- objective and step ----------------------------------------------------------------------
    objective = build_objective(cfg, components, total_steps)
    if cfg.use_log_norm_timesteps and cfg.loss_type not in ("mse", "l2"):
        log.warning("train.use_log_norm_timesteps is meant for the l2 loss; loss_type is %s", cfg.loss_type)
    log.info(
        "timesteps: train [%d, %d), reg [%d, %d)%s", cfg.min_timestep, cfg.max_timestep, *cfg.reg_timestep_range,
        ", log-normal" if cfg.use_log_norm_timesteps else "",
    )
    text_cache = None
    if cfg.cache_text_encoder_outputs:
        # Every caption the plan names, and the empty one cond_dropout trains, encoded once up front.
        text_cache = TextEmbeddingCache(components, accelerator.device, cfg.clip_skip)
        encoded = text_cache.warm(sorted({row["caption"] for row in plan} | {""}))
        log.info("text encoder outputs: %d captions encoded once and kept (train.cache_text_encoder_outputs)", encoded)
        if accelerator.device.type == "cuda" and not any(row["shuffle_tags"] for row in plan):
            # Every text a step can ask for is held (no image shuffles its tags): the encoders leave the GPU
            # (SDXL's take 1.6 GB in bf16); a sample prompt is encoded on the CPU.
            for encoder in components.text_encoders:
                encoder.to("cpu")
    step = TrainingStep(unet, components, objective, cfg, accelerator.device, accelerator.backward, text_cache)

    # --- validation: held-out images, fixed noise and timesteps (a local store only) -------------
    validator = None
    if holdout and not is_remote(paths.store):
        index = {row["cache_key"]: row for row in read_table(paths.index, "cache")}
        validator = Validator(
            [row for row in plan if row["image_id"] in holdout], LatentStore(Path(paths.store)), index,
            cfg.min_timestep, cfg.max_timestep, cfg.batch_size, cfg.seed,
        )

    # --- EMA, checkpoints and resume --------------------------------------------------------------
    ema = build_ema(cfg, network.trainable, total_steps)
    checkpointer = Checkpointer(
        run_dir / "checkpoints", network.trainable, optimizer, scheduler, loader, ema, cfg.save_last_n, identity,
        accelerator.is_main_process, started_at,
    )
    global_step = checkpointer.restore(source, cfg.seed) if source is not None else 0

    # --- logging and samples ---------------------------------------------------------------------
    # TensorBoard events per run (logs/run-<id>): a resumed run continues its own; a fresh one starts clean.
    logger = RunLogger(run_dir, accelerator.is_main_process, run_dir / "logs" / f"run-{identity.id[:12]}", fresh=global_step == 0)
    sampler = Sampler(components, params, run_dir / "samples", accelerator.device, logger, accelerator.is_main_process, ema is not None)
    progress = tqdm(total=total_steps, initial=global_step, desc="train", unit="step", disable=not accelerator.is_main_process)
    training = Training(
        cfg, paths, accelerator, components, step, optimizer, scheduler, loader, network.trainable, total_steps,
        validator, ema, checkpointer, sampler, logger, progress, validation_points=checkpointer.history.validation_points,
    )

    # --- the loop ----------------------------------------------------------------------------------
    with progress, stop_on_signals() as stop:
        result = fit(training, global_step, stop)

    # --- outputs -----------------------------------------------------------------------------------
    checkpointer.finish(result.global_step)
    result.images_per_second = training.throughput.images_per_second
    if training.throughput.other_seconds:
        log.info("outside the training steps: %s", ", ".join(f"{k} {v:.1f} s" for k, v in sorted(training.throughput.other_seconds.items())))
    if accelerator.is_main_process:
        started, finished = run_times(checkpointer.started_at)
        summary = RunSummary(
            components.version, components.prediction_type, rows=trained_rows(plan, holdout),
            ema_decay=ema.decay if ema is not None else None, max_train_steps=total_steps,
            num_epochs=math.ceil(total_steps / steps_per_epoch), num_processes=accelerator.num_processes,
            run_id=identity.id, started_at=started, finished_at=finished,
        )
        resolved = hashlib.sha256(json.dumps(declared_values(params, PARAMS), sort_keys=True).encode()).hexdigest()
        # The loop stops inside the epoch of its last step: loader.epoch is that epoch, 0-based.
        metadata = training_metadata(params, summary, result.global_step, loader.epoch + 1, resolved)
        result.output = save_outputs(
            run_dir, cfg, components, accelerator.unwrap_model(unet), network.lora_text_encoders, lambda: sampler.vae, ema, metadata,
        )
        if cfg.log_timesteps:
            write_timesteps(training.timesteps_log, run_dir / "logs" / "timesteps.parquet")
    # metrics.json holds what judges a run (`dvc metrics diff`, `dvc exp show`); throughput varies from
    # run to run, so it goes to perf.json, which DVC tracks as a plain output and never diffs.
    validated = [value for _, value in training.validation_points]  # a resumed run's included
    logger.finish(
        {"steps": result.global_step, "final_loss": result.losses[-1] if result.losses else None,
         "best_loss": min(result.losses) if result.losses else None,
         **({"validation_loss": validated[-1]} if validated else {})}
    )
    if accelerator.is_main_process:
        write_json(
            {"images_per_second": round(result.images_per_second, 3),
             "seconds_outside_steps": {key: round(value, 3) for key, value in sorted(training.throughput.other_seconds.items())}},
            run_dir / "perf.json",
        )
        draw_loss_curve(result.losses, training.validation_points, run_dir / "loss.png", first_step=result.global_step - len(result.losses) + 1)
    return result


def fit(t: Training, global_step: int, stop: StopRequest) -> TrainResult:
    """Epochs of optimizer steps until total_steps; logging, validation, checkpoints and samples on their cadence."""
    # The checkpointer's history: the losses before a resume are in it, and it saves what the loop appends.
    result = TrainResult(global_step, losses=t.checkpointer.history.losses)
    # Tests and wrappers wait for this line: from here on, Ctrl-C and SIGTERM save a checkpoint.
    log.info("train: ready at step %d of %d; Ctrl-C or SIGTERM saves a checkpoint", global_step, t.total_steps)
    if t.cfg.reflow_steps and global_step == 0:
        reflow(t.step, t.loader, t.optimizer, t.cfg)
    if global_step >= t.total_steps:
        draw_final_samples(t, global_step)
    while global_step < t.total_steps:
        epoch = t.loader.epoch
        if t.cfg.load_settings_every_epoch and t.paths.params_file and global_step > 0:
            t.cfg = reload_settings(t.cfg, t.paths.params_file, t.paths.overrides)
            t.step.configure(t.cfg, build_objective(t.cfg, t.components, t.total_steps))
        for batch in t.loader:
            output, loss, grad_norm = micro_step(t, batch, global_step)
            if loss is None:
                continue  # accumulating gradients: the optimizer has not stepped
            if skipped_nonfinite(t, result, loss, global_step):
                continue
            global_step += 1
            result.losses.append(loss)
            after_step(t, result, global_step, output, loss, grad_norm)
            if stop.signal or global_step >= t.total_steps:
                break
        # A signal during the last step changes nothing: the run is finished and its outputs are written.
        if stop.signal and global_step < t.total_steps:
            path = t.checkpointer.save("interrupted", global_step)
            raise Interrupted(
                f"{stop.signal}: stopped at step {global_step}; saved {path}. Continue with `kiln train` or `dvc repro` "
                "(this run resumes its own checkpoint)."
            )
        after_epoch(t, epoch + 1, global_step)
    result.global_step = global_step
    return result


def micro_step(t: Training, batch: dict[str, Any], global_step: int) -> tuple[StepOutput, float | None, Any]:
    """One batch forward and backward; when the accumulated gradients sync, clip them and step.
    Returns the output, the loss as a float once the optimizer stepped (else None; NaN when the step was
    skipped for a non-finite loss or gradient), and the grad norm."""
    with t.accelerator.accumulate(t.step.unet):
        output = t.step.train_step(batch, global_step, t.loader.generator())
        if not t.accelerator.sync_gradients:
            return output, None, None  # accumulating: the optimizer has not stepped
        grad_norm = None
        # fp16's loss scaler finds and skips inf gradients itself (and must see them to lower its scale).
        watch_grads = t.accelerator.mixed_precision != "fp16"
        if t.cfg.clip_grad_norm or watch_grads:
            grad_norm = t.accelerator.clip_grad_norm_(t.trainable, t.cfg.clip_grad_norm or float("inf"))
        # The step's one host sync (nanoGPT; GradScaler syncs here too): the loss, and the gradient norm
        # that shows a NaN or inf from any accumulated batch or any rank, read together before stepping.
        read = [output.loss.detach().float()] + ([grad_norm.detach().float()] if watch_grads else [])
        values = torch.stack(read).tolist()
        if not all(math.isfinite(value) for value in values):
            t.optimizer.zero_grad(set_to_none=True)  # the poisoned gradients go; no weight changes
            return output, math.nan, grad_norm
        t.optimizer.step()
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        loss = values[0]
    t.throughput.step_done(len(batch["captions"]))
    if t.cfg.log_timesteps:
        t.timesteps_log.extend(
            {"global_step": global_step, "image_id": image_id, "is_reg": bool(reg), "timestep": round(timestep)}
            for image_id, reg, timestep in zip(batch["image_ids"], batch["is_reg"], output.timesteps.tolist(), strict=True)
        )
    return output, loss, grad_norm


def skipped_nonfinite(t: Training, result: TrainResult, loss: float, global_step: int) -> bool:
    """A step whose loss or gradients were NaN or inf changed no weight; count it, and stop after
    train.max_nonfinite_steps in a row (the checkpoints written so far are kept)."""
    if math.isfinite(loss):
        t.nonfinite_in_a_row = 0
        return False
    t.nonfinite_in_a_row += 1
    result.nonfinite_steps += 1
    log.warning("train: NaN or inf loss or gradients after step %d; that step was skipped (%d in a row)", global_step, t.nonfinite_in_a_row)
    if t.nonfinite_in_a_row >= t.cfg.max_nonfinite_steps:
        raise KilnError(
            f"train: the loss or gradients were NaN or inf for {t.nonfinite_in_a_row} steps in a row after step "
            f"{global_step} (train.max_nonfinite_steps); stopped, keeping the checkpoints in {t.checkpointer.root}. "
            "Lower train.learning_rate, or try mixed_precision: bf16 instead of fp16."
        )
    return True


def after_step(t: Training, result: TrainResult, global_step: int, output: StepOutput, loss: float, grad_norm: Any) -> None:
    """EMA, progress, and what is due at this step: logs (with validation), a checkpoint, samples."""
    cfg = t.cfg
    if t.ema is not None:
        t.ema.step(global_step)
    lr = t.scheduler.get_last_lr()
    t.progress.update()
    t.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr[0]:.2e}", img_s=f"{t.throughput.images_per_second:.1f}")
    validating = due_or_last(cfg.validate_every, global_step, t.total_steps)
    if due_or_last(cfg.log_step, global_step, t.total_steps) or validating:
        values = {"loss": loss, "lr": lr[0], "images_per_second": t.throughput.images_per_second}
        values.update({f"lr/group_{i}": group_lr for i, group_lr in enumerate(lr)})
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        if output.fourier_component is not None:
            values["fourier_component"] = output.fourier_component.mean().item()
        if torch.cuda.is_available():
            values["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if cfg.mode == "lora":
            values.update(lora_block_magnitudes(t.accelerator.unwrap_model(t.step.unet)))
        if validating:
            with t.throughput.excluding("validation"):
                result.validation_losses.append(t.validator.loss(t.step) if t.validator is not None else None)
            values["validation_loss"] = result.validation_losses[-1]
            if values["validation_loss"] is not None:
                t.validation_points.append((global_step, values["validation_loss"]))
        t.logger.scalars(global_step, {k: v for k, v in values.items() if v is not None}, ("loss", "lr", "validation_loss", "fourier_component"))
        t.logger.histogram(global_step, "timesteps", output.timesteps)
    minutes_up = cfg.save_every_n_minutes is not None and time.monotonic() - t.last_save >= cfg.save_every_n_minutes * 60
    if due(cfg.save_every_n_steps, global_step) or minutes_up:
        with t.throughput.excluding("checkpoints"):
            t.checkpointer.save(f"step-{global_step:08d}", global_step)
        t.last_save = time.monotonic()
    if due(t.sampler.every_n_steps, global_step):
        with t.throughput.excluding("samples"):
            t.sampler.draw(f"step-{global_step:08d}", global_step, t.accelerator.unwrap_model(t.step.unet), t.ema, cfg.clip_skip)


def after_epoch(t: Training, epochs_done: int, global_step: int) -> None:
    """What is due when an epoch ends: a checkpoint, samples."""
    if due(t.cfg.save_every_n_epochs, epochs_done):
        with t.throughput.excluding("checkpoints"):
            t.checkpointer.save(f"epoch-{epochs_done:04d}", global_step)
    if due(t.sampler.every_n_epochs, epochs_done):
        with t.throughput.excluding("samples"):
            t.sampler.draw(f"epoch-{epochs_done:04d}", global_step, t.accelerator.unwrap_model(t.step.unet), t.ema, t.cfg.clip_skip)


def draw_final_samples(t: Training, global_step: int) -> None:
    """A run resumed from its final checkpoint trains no step, so nothing in the loop draws: draw what its
    last step and epoch drew. `dvc repro` reruns train so when only a NOT_WEIGHTS key changed (sample_prompts,
    say) or a declared output is missing, and resumes (the run identity is unchanged)."""
    unet = t.accelerator.unwrap_model(t.step.unet)
    epochs_done = t.loader.epoch + 1  # the loop stops inside the epoch of its last step (as in `run`)
    with t.throughput.excluding("samples"):
        if due(t.sampler.every_n_steps, global_step):
            t.sampler.draw(f"step-{global_step:08d}", global_step, unet, t.ema, t.cfg.clip_skip)
        if due(t.sampler.every_n_epochs, epochs_done):
            t.sampler.draw(f"epoch-{epochs_done:04d}", global_step, unet, t.ema, t.cfg.clip_skip)
