"""Rectified flow (Liu et al. 2022, "Flow Straight and Fast") and reflow, after EveryDream2's document.

Rectified flow trains the UNet on the straight path between noise and data: with x0 ~ N(0, I) and x1
the clean latents, x_t = t x1 + (1 - t) x0 for t ~ U[0, 1), and the UNet predicts the constant velocity
v = x1 - x0 of that path. Sampling integrates dx/dt = v(x_t, t) from t = 0 (noise) to t = 1 (latents).

Reflow straightens the learned flow: pairs (x0', x1'') of noise and the model's own ODE solution from it
are a deterministic coupling, so training on them (instead of on fresh, independent noise) removes the
crossing paths that made the flow curve, and fewer Euler steps reach the same endpoint.

The UNet is told the time as `t * num_train_timesteps`, a float tensor: diffusers' UNet accepts float
timesteps (its sinusoidal embedding is continuous), and rounding would throw away the time resolution
that a few-step Euler solver depends on. The base model must predict v, so that its output head already
means "a velocity" (EveryDream2 only allows rectified flow on v-prediction models).

Everything here works on tensors of any rank (B, ...): (B, C, H, W) latents, or (B, 2) toy points.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import KilnError
from pipeline.loader import batch_generator
from pipeline.losses import LossResult
from pipeline.noise import NoiseSettings, input_perturbation, training_noise
from pipeline.objective import NoisyBatch
from pipeline.timesteps import ranges as timestep_ranges

if TYPE_CHECKING:
    from pipeline.params import TrainParams
    from pipeline.step import TrainingStep

log = logging.getLogger(__name__)

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x_t, timesteps scaled to num_train_timesteps, shape (B,)) -> the predicted velocity, shaped like x_t."""

DEFAULT_REFLOW_SAMPLE_STEPS = 50


def check_rectified_flow(prediction_type: str) -> None:
    """Raise unless the base model predicts v: rectified flow re-purposes the v head as a velocity."""
    if prediction_type != "v_prediction":
        raise KilnError(
            f"train.rectified_flow: needs a v-prediction base model, but this one predicts {prediction_type}; "
            "use a v_prediction model (e.g. SD 2.x 768-v) or turn train.rectified_flow off"
        )


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor shaped to broadcast over `like` (B, ...), on its device and in its dtype."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *[1] * (like.dim() - 1))


class RectifiedFlowObjective:
    """The rectified-flow path, target and loss, behind the same interface as DiffusionObjective.

    What carries over from the diffusion settings: the timestep ranges, as t in [min/1000, max/1000)
    (so reg images can have their own range, as with DDPM); the noise settings, which shape x0 (offset
    and pyramid noise) and the model's input (input perturbation) exactly as they shape DDPM's noise;
    per-sample loss weights and masks. Settings tied to the diffusion schedule (SNR weightings,
    zero terminal SNR, log-normal timesteps, the Huber and Fourier losses) are refused when the
    params are validated (TrainParams).
    """

    def __init__(
        self, num_train_timesteps: int = 1000, train_range: tuple[int, int] | None = None,
        reg_range: tuple[int, int] | None = None, noise: NoiseSettings | None = None,
    ):
        if num_train_timesteps < 1:
            raise KilnError(f"rectified flow: num_train_timesteps must be at least 1, not {num_train_timesteps}")
        self.num_train_timesteps = num_train_timesteps
        self.train_range = train_range or (0, num_train_timesteps)
        self.reg_range = reg_range or self.train_range
        self.noise_settings = noise or NoiseSettings()

    def sample_t(self, is_reg: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """t ~ U[low/N, high/N) per sample from its range, float64 on the CPU (a CPU generator, so runs
        are reproducible). The full range [0, N) gives t = u exactly."""
        low, high = timestep_ranges(is_reg.cpu(), self.train_range, self.reg_range)
        u = torch.rand(is_reg.shape, generator=generator, dtype=torch.float64)
        return low.double() / self.num_train_timesteps + u * ((high - low).double() / self.num_train_timesteps)

    def prepare(
        self, latents: torch.Tensor, is_reg: torch.Tensor, generator: torch.Generator, global_step: int = 0,
        noise: torch.Tensor | None = None,
    ) -> NoisyBatch:
        """x_t = t x1 + (1 - t) x0 with x1 = latents; the target is v = x1 - x0.

        t is drawn first, then x0 (the configured training noise) unless `noise` is given (reflow passes
        its cached x0'), so a seeded generator gives the same t whichever is passed.
        """
        del global_step  # no flow setting depends on it
        t = self.sample_t(is_reg, generator)
        if noise is None:
            noise = training_noise(latents, self.noise_settings, generator)
        elif noise.shape != latents.shape:
            raise KilnError(
                f"rectified flow: noise shape {tuple(noise.shape)} does not match latents {tuple(latents.shape)}"
            )
        noise = noise.to(device=latents.device, dtype=latents.dtype)
        return self.along_path(latents, t, noise, input_perturbation(noise, self.noise_settings, generator))

    def with_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> NoisyBatch:
        """The path at given timesteps (t = timesteps / N) and noise: validation's fixed draws."""
        t = timesteps.cpu().double() / self.num_train_timesteps
        return self.along_path(latents, t, noise.to(device=latents.device, dtype=latents.dtype))

    def along_path(
        self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, input_noise: torch.Tensor | None = None,
    ) -> NoisyBatch:
        """The point at t (B,) on the straight path from x0 = noise to x1 = latents, and its velocity.

        With input perturbation the model's input is made with `input_noise` while the target keeps x0.
        `timesteps` is t * num_train_timesteps as float32 on the latents' device (what the UNet is given).
        """
        if t.shape != (latents.shape[0],):
            raise KilnError(f"rectified flow: t must have shape ({latents.shape[0]},), not {tuple(t.shape)}")
        t_b = _per_sample(t, latents)
        source = noise if input_noise is None else input_noise
        noisy_latents = t_b * latents + (1 - t_b) * source
        # float32 rather than float64: the UNet's time embedding is float32 and some devices lack float64.
        timesteps = (t.double() * self.num_train_timesteps).to(device=latents.device, dtype=torch.float32)
        return NoisyBatch(noisy_latents, timesteps, noise, latents - noise)

    def compute_loss(
        self, model_pred: torch.Tensor, batch: NoisyBatch, loss_weight: torch.Tensor,
        masks: torch.Tensor | None = None, global_step: int = 0,
    ) -> LossResult:
        """MSE to v per element, averaged over all but the batch dimension, times each sample's weight;
        a mask is normalised to mean 1 per sample (as DiffusionObjective's)."""
        del global_step  # the plain MSE does not depend on it
        error = (model_pred.float() - batch.target.float()) ** 2
        dims = tuple(range(1, error.dim()))
        if masks is not None:
            weights = masks.float() / masks.float().mean(dim=dims, keepdim=True).clamp_min(1e-6)
            error = error * weights
        per_sample = error.mean(dim=dims) if dims else error
        per_sample = per_sample * loss_weight.to(per_sample.device).float()
        return LossResult(per_sample.mean(), per_sample)


def euler_solve(velocity: VelocityFn, x0: torch.Tensor, steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 0 (x0, noise) to t = 1 with `steps` equal Euler steps."""
    if steps < 1:
        raise KilnError(f"rectified flow: the Euler solver needs at least 1 step, not {steps}")
    x = x0
    dt = 1.0 / steps
    for i in range(steps):
        # The time at the start of each step (explicit Euler), scaled as the UNet was trained to see it.
        timesteps = torch.full((x.shape[0],), i * dt * num_train_timesteps, device=x.device, dtype=torch.float32)
        x = x + dt * velocity(x, timesteps).to(x.dtype)
    return x


@torch.no_grad()
def straightness(velocity: VelocityFn, x0: torch.Tensor, steps: int = 50, num_train_timesteps: int = 1000) -> float:
    """Mean per-sample L2 gap between the 1-step and the `steps`-step Euler endpoints from x0.

    A perfectly straight flow has a constant velocity along each path, so one step lands where many do
    and the gap is 0; the more the paths curve, the larger the gap.
    """
    one_step = euler_solve(velocity, x0, 1, num_train_timesteps)
    many_steps = euler_solve(velocity, x0, steps, num_train_timesteps)
    return (one_step - many_steps).flatten(1).float().norm(dim=1).mean().item()


@dataclass
class ReflowPairs:
    """Cached reflow pairs on the CPU: noise x0' and the model's ODE endpoint x1'', and each batch's conditioning.

    `noise` and `latents` are the generated batches concatenated along dim 0; `extras` holds one
    conditioning object per generated batch, and `batch_sizes` how many rows of each belong to it.
    """

    noise: torch.Tensor
    latents: torch.Tensor
    extras: list[Any]
    batch_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.noise.shape != self.latents.shape:
            raise KilnError(
                f"reflow: noise shape {tuple(self.noise.shape)} does not match latents {tuple(self.latents.shape)}"
            )
        if not self.batch_sizes and len(self.extras) == 1:
            self.batch_sizes = [self.noise.shape[0]]  # a single batch needs no bookkeeping

    @classmethod
    def from_generated(cls, pairs: list[tuple[torch.Tensor, torch.Tensor, Any]]) -> ReflowPairs:
        """Concatenate generate_reflow_pairs' output (the batches must share their non-batch shape)."""
        if not pairs:
            raise KilnError("reflow: no pairs were generated; is train.reflow_gen_batches at least 1?")
        shapes = {tuple(noise.shape[1:]) for noise, _, _ in pairs}
        if len(shapes) > 1:
            # Aspect buckets give different latent sizes: keep such pairs as the per-batch list instead.
            raise KilnError(f"reflow: cannot concatenate pairs of different latent shapes {sorted(shapes)}")
        return cls(
            noise=torch.cat([noise for noise, _, _ in pairs]).cpu(),
            latents=torch.cat([latents for _, latents, _ in pairs]).cpu(),
            extras=[extra for _, _, extra in pairs],
            batch_sizes=[noise.shape[0] for noise, _, _ in pairs],
        )

    def __len__(self) -> int:
        return self.noise.shape[0]

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
        """The pairs split back into their generated batches: [(x0', x1'', conditioning)]."""
        if sum(self.batch_sizes) != len(self) or len(self.batch_sizes) != len(self.extras):
            raise KilnError("reflow: batch_sizes do not match the cached pairs and their extras")
        noise = self.noise.split(self.batch_sizes)
        latents = self.latents.split(self.batch_sizes)
        return list(zip(noise, latents, self.extras, strict=True))


def generate_reflow_pairs(
    velocity_for_batch: Callable[[Any], VelocityFn],
    batches: Iterable[tuple[torch.Tensor, Any]],
    n_batches: int,
    steps: int,
    generator: torch.Generator,
    num_train_timesteps: int = 1000,
) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
    """Noise x0' ~ N(0, I) and the model's Euler solution x1'' from it, for the first `n_batches` batches.

    Each batch's latents only give the shape, device and dtype (the endpoint is the model's, not the data);
    its conditioning selects the velocity field via `velocity_for_batch`. Pairs go to the CPU so that a
    large reflow cache does not hold accelerator memory while training on it.
    """
    if n_batches < 1:
        raise KilnError(f"train.reflow_gen_batches: must be at least 1, not {n_batches}")
    pairs: list[tuple[torch.Tensor, torch.Tensor, Any]] = []
    for latents, conditioning in islice(batches, n_batches):
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        with torch.no_grad():
            endpoint = euler_solve(velocity_for_batch(conditioning), noise, steps, num_train_timesteps)
        pairs.append((noise.cpu(), endpoint.detach().cpu(), conditioning))
    return pairs


def reflow_sample_steps(reflow_sample_steps: int | None) -> int:
    """Euler steps for reflow generation: train.reflow_sample_steps, else 50."""
    if reflow_sample_steps is not None:
        if reflow_sample_steps < 1:
            raise KilnError(f"train.reflow_sample_steps: must be at least 1, not {reflow_sample_steps}")
        return reflow_sample_steps
    return DEFAULT_REFLOW_SAMPLE_STEPS


def velocity_field(step: TrainingStep, batch: dict[str, Any]) -> VelocityFn:
    """The UNet as a velocity field under one batch's conditioning (the ODE reflow solves)."""
    return functools.partial(step.predict, conditioning=step.encode(batch["captions"], batch["time_ids"]))


def reflow(step: TrainingStep, loader: Any, optimizer: Any, cfg: TrainParams) -> list[float]:
    """EveryDream2's reflow, before the main epochs: reflow_steps times, pairs (noise x0', the model's Euler
    solution x1'') from reflow_gen_batches batches, then reflow_train_epochs epochs of training steps on
    them with x1'' as the latents and x0' as the noise (so the target is x1'' - x0'). Returns the losses.

    The batches are borrowed: the loader is put back where it was, so the main loop starts where it
    would have. Reflow trains at the peak learning rate; warmup would otherwise start it at zero.
    """
    steps = reflow_sample_steps(cfg.reflow_sample_steps)
    position = loader.state_dict()
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    losses: list[float] = []
    try:
        for iteration in range(cfg.reflow_steps):
            generator = batch_generator(cfg.seed, -1 - iteration, 0)
            batches = ((step.latents(batch), batch) for batch in loader)
            pairs = generate_reflow_pairs(
                functools.partial(velocity_field, step), batches, cfg.reflow_gen_batches, steps, generator,
                step.objective.num_train_timesteps,
            )
            loader.load_state_dict(position)
            iteration_losses = []
            for _ in range(cfg.reflow_train_epochs):
                for noise, endpoint, batch in pairs:
                    output = step.train_step(batch, 0, generator, latents=endpoint, noise=noise)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    iteration_losses.append(output.loss.item())
            log.info(
                "reflow %d/%d: %d pairs of batches, mean loss %.4f", iteration + 1, cfg.reflow_steps, len(pairs),
                sum(iteration_losses) / max(len(iteration_losses), 1),
            )
            losses += iteration_losses
    finally:
        for group, lr in zip(optimizer.param_groups, peak_lrs, strict=True):
            group["lr"] = lr
        loader.load_state_dict(position)
    return losses
