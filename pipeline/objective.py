"""The diffusion training objective: noise, timesteps, noisy latents, target and the weighted loss.

One small CPU-testable object. Timesteps are drawn per sample from per-sample ranges (so regularisation
images can have their own), the loss takes per-sample weights and latent-size masks, and it is told the
global step so that step-dependent losses can plug in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class NoisyBatch:
    noisy_latents: torch.Tensor  # (B, C, H, W)
    timesteps: torch.Tensor  # (B,) int64
    noise: torch.Tensor  # (B, C, H, W)
    target: torch.Tensor  # what the UNet should predict: noise (epsilon) or velocity (v)


class DiffusionObjective:
    """DDPM forward process (Ho et al. 2020) with epsilon or v targets (Salimans & Ho 2022, section 4)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, not {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.double()
        self.prediction_type = prediction_type
        self.num_train_timesteps = len(alphas_cumprod)

    @classmethod
    def from_scheduler(cls, scheduler: Any, prediction_type: str | None = None) -> DiffusionObjective:
        """From a diffusers noise scheduler (its betas, and its prediction_type unless overridden)."""
        return cls(scheduler.alphas_cumprod, prediction_type or scheduler.config.prediction_type)

    def sample_timesteps(self, low: torch.Tensor, high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Uniform integers in [low, high) per sample; where low == high, exactly that value."""
        uniform = torch.rand(low.shape, generator=generator, dtype=torch.float64)
        span = (high - low).clamp_min(0).double()
        timesteps = low.double() + torch.floor(uniform * span)
        return timesteps.long().clamp(0, self.num_train_timesteps - 1)

    def _scales(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return alpha_bar.sqrt().view(shape).to(like.dtype), (1 - alpha_bar).sqrt().view(shape).to(like.dtype)

    def prepare(self, latents: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        """x_t = sqrt(a_bar) x_0 + sqrt(1 - a_bar) eps; the target is eps, or v = sqrt(a_bar) eps - sqrt(1 - a_bar) x_0."""
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        return self.with_noise(latents, timesteps, noise)

    def with_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> NoisyBatch:
        """The same forward process with given noise (fixed noise makes a stable validation curve)."""
        signal, sigma = self._scales(timesteps, latents)
        noisy = signal * latents + sigma * noise
        target = noise if self.prediction_type == "epsilon" else signal * noise - sigma * latents
        return NoisyBatch(noisy, timesteps, noise, target)

    def loss(
        self, model_pred: torch.Tensor, batch: NoisyBatch, loss_weight: torch.Tensor,
        masks: torch.Tensor | None = None, global_step: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE per element, mask-weighted, spatially averaged per sample, times each sample's weight.

        Returns (the batch loss, the per-sample losses). A mask is normalised to mean 1 per sample, so the
        masked loss keeps the unmasked scale (sd-trainer's masked score estimation).
        """
        del global_step  # the plain MSE does not depend on it; step-scheduled losses do
        error = (model_pred.float() - batch.target.float()) ** 2  # (B, C, H, W)
        if masks is not None:
            weights = masks.float() / masks.float().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            error = error * weights
        per_sample = error.mean(dim=(1, 2, 3)) * loss_weight.float()
        return per_sample.mean(), per_sample
