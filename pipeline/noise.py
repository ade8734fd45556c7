"""The noise a training step adds, and the noise schedule it is added with.

Offset noise (kohya `noise_offset`, EveryDream2 `zero_frequency_noise_ratio`), pyramid / multi-resolution
noise (kohya `multires_noise_*`, EveryDream2 `pyramid_noise_discount`), input-perturbation noise
(`ip_noise_gamma`) and zero-terminal-SNR betas (Lin et al. 2023). Every draw takes the step's generator,
so a resumed run adds exactly the noise the uninterrupted one would have.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoiseSettings:
    offset: float = 0.0  # noise_offset / zero_frequency_noise_ratio
    offset_random_strength: bool = False
    adaptive_scale: float | None = None
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_gamma: float = 0.0
    ip_gamma_random_strength: bool = False

    @classmethod
    def from_params(cls, cfg: object) -> NoiseSettings:
        iterations, discount = cfg.multires_noise_iterations, cfg.multires_noise_discount
        if cfg.pyramid_noise_discount is not None:  # EveryDream2: 10 levels unless told otherwise
            iterations, discount = iterations or 10, cfg.pyramid_noise_discount
        return cls(
            cfg.noise_offset, cfg.noise_offset_random_strength, cfg.adaptive_noise_scale, iterations, discount,
            cfg.ip_noise_gamma, cfg.ip_noise_gamma_random_strength,
        )


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU generator, then moved: the same numbers on every device.
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def offset_noise(noise: torch.Tensor, latents: torch.Tensor, settings: NoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """noise + offset · N(0, 1) per (sample, channel): a zero-frequency component (Guttenberg 2023).

    With adaptive_scale the offset grows by adaptive_scale · |channel mean of the latents| (clamped at
    0), and with random strength it is scaled by one uniform draw per step, as kohya does.
    """
    if settings.offset <= 0:
        return noise
    offset: float | torch.Tensor = settings.offset
    if settings.offset_random_strength:
        offset = offset * _uniform(generator)
    if settings.adaptive_scale is not None:
        channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        offset = (offset + settings.adaptive_scale * channel_mean).clamp_min(0)
    per_channel = _randn((noise.shape[0], noise.shape[1], 1, 1), generator, noise)
    return noise + (offset * per_channel).to(noise.dtype)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Add `iterations` noise levels i = 0, 1, ..., each upsampled bilinearly and weighted discount ** i.

    Level i has a resolution 1/r^i of the latents, with r drawn uniformly in [2, 4) per level, so level 0
    is a second full-resolution draw, as in kohya's and EveryDream2's loops; it stops at a 1-pixel level.
    The sum is rescaled to unit std.
    """
    if iterations <= 0:
        return noise
    batch, channels, height, width = noise.shape
    total = noise.float().clone()
    for level in range(iterations):
        ratio = 2 + 2 * _uniform(generator)
        low_h, low_w = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
        coarse = torch.randn((batch, channels, low_h, low_w), generator=generator, dtype=torch.float32).to(noise.device)
        total += F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) * discount**level
        if low_h == 1 or low_w == 1:
            break
    return (total / total.std()).to(noise.dtype)


def training_noise(latents: torch.Tensor, settings: NoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """The target noise of a step: Gaussian, then pyramid levels, then the offset."""
    noise = _randn(tuple(latents.shape), generator, latents)
    noise = pyramid_noise(noise, settings.multires_iterations, settings.multires_discount, generator)
    return offset_noise(noise, latents, settings, generator)


def input_perturbation(noise: torch.Tensor, settings: NoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """The noise the model sees with input perturbation: noise + γ·ξ (Ning et al. 2023). The target
    keeps `noise`; γ is scaled by one uniform draw per step with random strength."""
    if settings.ip_gamma <= 0:
        return noise
    gamma = settings.ip_gamma * (_uniform(generator) if settings.ip_gamma_random_strength else 1.0)
    return noise + gamma * _randn(tuple(noise.shape), generator, noise)


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale ᾱ so the last timestep has zero SNR, keeping the first (Lin et al. 2023, Algorithm 1).

    √ᾱ is shifted so its last value is 0 and scaled so its first is unchanged.
    """
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    rescaled = (root - last) * first / (first - last)
    return rescaled**2


def warn_zero_terminal_snr(prediction_type: str) -> None:
    if prediction_type == "epsilon":
        log.warning(
            "train.zero_terminal_snr with an epsilon-prediction model: at the last timestep the input is pure noise, so "
            "predicting the noise is trivial and the image content is never learned there. Lin et al. pair it with "
            "v-prediction (model.v_parameterization)."
        )
