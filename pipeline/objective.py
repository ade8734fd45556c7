"""The training objective: noise, timesteps, noisy latents, target and the weighted loss.

Every objective (this DDPM one, and pipeline.flow's rectified flow) has the same interface, so the
training step never asks which one is active:

    prepare(latents, is_reg, generator, global_step, noise=None) -> NoisyBatch
    with_noise(latents, timesteps, noise) -> NoisyBatch          (fixed draws, for validation)
    compute_loss(model_pred, noisy, loss_weight, masks, global_step) -> LossResult

The objective owns the train and regularisation timestep ranges: `prepare` draws each sample's
timestep from its own range. The loss takes per-sample weights and latent-size masks, and is told the
global step so that step-dependent losses can plug in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline import timesteps as timestep_draws
from pipeline.losses import LossResult, LossSettings
from pipeline.losses import compute as compute_loss
from pipeline.noise import NoiseSettings, input_perturbation, training_noise, warn_zero_terminal_snr
from pipeline.noise import zero_terminal_snr as rescale_zero_terminal_snr


@dataclass
class NoisyBatch:
    noisy_latents: torch.Tensor  # (B, C, H, W)
    timesteps: torch.Tensor  # (B,) what the UNet is told: int64 DDPM steps, or float t * 1000 for flow
    noise: torch.Tensor  # (B, C, H, W)
    target: torch.Tensor  # what the UNet should predict: noise (epsilon), velocity (v) or x1 - x0 (flow)


class Objective(Protocol):
    """What the training step, validation and reflow need of an objective."""

    num_train_timesteps: int

    def prepare(
        self, latents: torch.Tensor, is_reg: torch.Tensor, generator: torch.Generator, global_step: int = 0,
        noise: torch.Tensor | None = None,
    ) -> NoisyBatch: ...

    def with_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> NoisyBatch: ...

    def compute_loss(
        self, model_pred: torch.Tensor, batch: NoisyBatch, loss_weight: torch.Tensor,
        masks: torch.Tensor | None = None, global_step: int = 0,
    ) -> LossResult: ...


class DiffusionObjective:
    """DDPM forward process (Ho et al. 2020) with epsilon or v targets (Salimans & Ho 2022, section 4).

    The noise (offset, pyramid, input perturbation), the schedule (zero terminal SNR), the timestep
    distribution and the loss are configured here and computed in their own modules.
    """

    def __init__(
        self, alphas_cumprod: torch.Tensor, prediction_type: str, loss: LossSettings | None = None,
        noise: NoiseSettings | None = None, zero_terminal_snr: bool = False, log_norm_timesteps: bool = False,
        train_range: tuple[int, int] | None = None, reg_range: tuple[int, int] | None = None,
        max_train_steps: int | None = None,
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, not {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.double()
        if zero_terminal_snr:
            self.alphas_cumprod = rescale_zero_terminal_snr(self.alphas_cumprod)
            warn_zero_terminal_snr(prediction_type)
        self.prediction_type = prediction_type
        self.num_train_timesteps = len(alphas_cumprod)
        self.loss_settings = loss or LossSettings()
        self.noise_settings = noise or NoiseSettings()
        self.log_norm_timesteps = log_norm_timesteps
        # [low, high) per sample kind; the reg range defaults to the train range (kohya's min/max_timestep).
        self.train_range = train_range or (0, self.num_train_timesteps)
        self.reg_range = reg_range or self.train_range
        self.max_train_steps = max_train_steps  # the log-normal schedule's progress

    @classmethod
    def from_scheduler(cls, scheduler: Any, prediction_type: str | None = None, **settings: Any) -> DiffusionObjective:
        """From a diffusers noise scheduler (its betas, and its prediction_type unless overridden)."""
        return cls(scheduler.alphas_cumprod, prediction_type or scheduler.config.prediction_type, **settings)

    def sample_timesteps(
        self, low: torch.Tensor, high: torch.Tensor, generator: torch.Generator, global_step: int = 0,
        max_train_steps: int | None = None,
    ) -> torch.Tensor:
        """Per-sample timesteps in [low, high): uniform, or log-normal with use_log_norm_timesteps."""
        if self.log_norm_timesteps:
            mu = timestep_draws.log_norm_mu(global_step, max_train_steps)
            return timestep_draws.log_normal(low, high, mu, generator, self.num_train_timesteps)
        return timestep_draws.uniform(low, high, generator, self.num_train_timesteps)

    def _scales(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return alpha_bar.sqrt().view(shape).to(like.dtype), (1 - alpha_bar).sqrt().view(shape).to(like.dtype)

    def prepare(
        self, latents: torch.Tensor, is_reg: torch.Tensor, generator: torch.Generator, global_step: int = 0,
        noise: torch.Tensor | None = None,
    ) -> NoisyBatch:
        """Each sample's timestep from its own range (reg or train), then the forward process; `noise`
        replaces the drawn noise (the timesteps are drawn first either way)."""
        low, high = timestep_draws.ranges(is_reg.cpu(), self.train_range, self.reg_range)
        timesteps = self.sample_timesteps(low, high, generator, global_step, self.max_train_steps).to(latents.device)
        if noise is None:
            return self.add_noise(latents, timesteps, generator)
        noise = noise.to(device=latents.device, dtype=latents.dtype)
        return self.with_noise(latents, timesteps, noise, input_perturbation(noise, self.noise_settings, generator))

    def add_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        """x_t = sqrt(a_bar) x_0 + sqrt(1 - a_bar) eps; the target is eps, or v = sqrt(a_bar) eps - sqrt(1 - a_bar) x_0.

        eps carries the configured offset and pyramid noise; with input perturbation the model's input
        is made with eps + γ·ξ while the target keeps eps.
        """
        noise = training_noise(latents, self.noise_settings, generator)
        return self.with_noise(latents, timesteps, noise, input_perturbation(noise, self.noise_settings, generator))

    def with_noise(
        self, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, input_noise: torch.Tensor | None = None,
    ) -> NoisyBatch:
        """The forward process with given noise (fixed noise makes a stable validation curve)."""
        signal, sigma = self._scales(timesteps, latents)
        noisy = signal * latents + sigma * (noise if input_noise is None else input_noise)
        target = noise if self.prediction_type == "epsilon" else signal * noise - sigma * latents
        return NoisyBatch(noisy, timesteps, noise, target)

    def compute_loss(
        self, model_pred: torch.Tensor, batch: NoisyBatch, loss_weight: torch.Tensor,
        masks: torch.Tensor | None = None, global_step: int = 0,
    ) -> LossResult:
        """The configured loss, with its Fourier component (pipeline.losses)."""
        return compute_loss(
            model_pred, batch.target, batch.timesteps, self.alphas_cumprod, self.loss_settings, loss_weight.to(model_pred.device),
            self.prediction_type == "v_prediction", masks, global_step,
        )
