"""Training losses: the element-wise loss type, the per-timestep weightings and the Fourier term.

The order follows kohya's trainer: an element-wise loss (mse, l1, huber, smooth_l1, EveryDream2's
mse_huber / huber_mse), weighted by the normalised mask, averaged per sample, then multiplied by the
timestep weighting (min-SNR, debiased estimation) and by the plan's per-sample loss_weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.fourier import FourierSettings, fourier_term


@dataclass(frozen=True)
class LossSettings:
    loss_type: str = "mse"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False
    fourier: FourierSettings | None = None  # with loss_type fourier
    max_train_steps: int | None = None  # for the Fourier term's progress

    @classmethod
    def from_params(cls, cfg: object, max_train_steps: int | None) -> LossSettings:
        fourier = None
        if cfg.loss_type == "fourier":
            fourier = FourierSettings(
                weight=cfg.fourier_weight, mode=cfg.fourier_mode, norm=cfg.fourier_norm,
                high_freq_weight=cfg.fourier_high_freq_weight, scales=tuple(cfg.fourier_scales),
                scale_weights=tuple(cfg.fourier_scale_weights) if cfg.fourier_scale_weights else None,
                warmup_steps=cfg.fourier_warmup_steps, adaptive_max_weight=cfg.fourier_adaptive_max_weight,
                adaptive_min_weight=cfg.fourier_adaptive_min_weight,
            )
        return cls(
            "mse" if cfg.loss_type == "l2" else cfg.loss_type, cfg.huber_c, cfg.huber_schedule, cfg.min_snr_gamma,
            cfg.debiased_estimation_loss, fourier, max_train_steps,
        )


@dataclass
class LossResult:
    loss: torch.Tensor  # the batch loss (mean over samples)
    per_sample: torch.Tensor  # (B,)
    fourier_component: torch.Tensor | None = None  # (B,) w·F, already inside per_sample


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ / (1 − ᾱ) at each timestep, in float64 (0 at a zero-terminal-SNR last step)."""
    alpha_bar = alphas_cumprod.double().to(timesteps.device)[timesteps]
    return alpha_bar / (1 - alpha_bar)


def huber_threshold(timesteps: torch.Tensor, schedule: str, c: float, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """kohya's huber_c per sample: constant c; exponential exp(−ln(1/c)·t/T), 1 at t = 0 down to c at T;
    snr (1 − c)/(1 + σ_t)² + c with σ_t = √((1 − ᾱ)/ᾱ), near 1 at low noise and near c at high."""
    if schedule == "constant":
        return torch.full(timesteps.shape, c, dtype=torch.float64, device=timesteps.device)
    if schedule == "exponential":
        rate = -math.log(c) / len(alphas_cumprod)
        return torch.exp(-rate * timesteps.double())
    alpha_bar = alphas_cumprod.double().to(timesteps.device)[timesteps]
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    return (1 - c) / (1 + sigma) ** 2 + c


def _pseudo_huber(error: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(error**2 + delta**2) - delta


def elementwise(
    pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, settings: LossSettings, alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """The loss per element, float32, shape of pred."""
    pred, target = pred.float(), target.float()
    kind = settings.loss_type
    if kind == "fourier":
        kind = "mse" if settings.fourier.norm == "l2" else "l1"
    if kind == "mse":
        return (pred - target) ** 2
    if kind == "l1":
        return (pred - target).abs()
    if kind in ("huber", "smooth_l1"):
        shape = (-1,) + (1,) * (pred.dim() - 1)
        c = huber_threshold(timesteps, settings.huber_schedule, settings.huber_c, alphas_cumprod).float().view(shape)
        pseudo = _pseudo_huber(pred - target, c)
        # kohya: huber is 2c·(√(e² + c²) − c), smooth_l1 drops the leading c (2·(√(e² + c²) − c)).
        return 2 * c * pseudo if kind == "huber" else 2 * pseudo
    # EveryDream2's blend: the Huber share grows (mse_huber) or falls (huber_mse) linearly with the timestep,
    # Huber with delta 1 as EveryDream2 uses.
    share = (timesteps.float() / (len(alphas_cumprod) - 1)).view((-1,) + (1,) * (pred.dim() - 1))
    if kind == "huber_mse":
        share = 1 - share
    mse = F.mse_loss(pred, target, reduction="none")
    huber = F.huber_loss(pred, target, reduction="none", delta=1.0)
    return mse * (1 - share) + huber * share


def timestep_weight(snr_values: torch.Tensor, settings: LossSettings, v_prediction: bool) -> torch.Tensor | None:
    """The per-sample weight of min-SNR (Hang et al. 2023) and / or debiased estimation, or None."""
    weight = None
    if settings.min_snr_gamma is not None:
        clipped = torch.clamp(snr_values, max=settings.min_snr_gamma)
        if v_prediction:
            # The v target is a mix of noise and signal: its loss equals the ε loss × (SNR + 1).
            weight = clipped / (snr_values + 1)
        else:
            # min(SNR, γ)/SNR tends to 1 as SNR → 0 (a zero-terminal-SNR last step): use the limit there.
            weight = torch.where(snr_values > 0, clipped / snr_values.clamp_min(1e-30), torch.ones_like(snr_values))
    if settings.debiased_estimation:
        # kohya clamps the SNR at 1000. For ε a floor keeps 1/√SNR finite (at most √1000) near a
        # zero-terminal-SNR step; 1/(SNR + 1) is finite there already, so v takes no floor.
        bounded = snr_values.clamp(max=1000)
        debiased = 1 / (bounded + 1) if v_prediction else 1 / bounded.clamp_min(1e-3).sqrt()
        weight = debiased if weight is None else weight * debiased
    return weight


def compute(
    pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
    settings: LossSettings, loss_weight: torch.Tensor, v_prediction: bool,
    masks: torch.Tensor | None = None, global_step: int = 0,
) -> LossResult:
    """Element-wise loss → mask weighting → per-sample mean → timestep weight → + Fourier term → × loss_weight."""
    error = elementwise(pred, target, timesteps, settings, alphas_cumprod)
    if masks is not None:
        # Normalised to mean 1 per sample so the masked loss keeps the unmasked scale (masked score estimation).
        weights = masks.float() / masks.float().mean(dim=tuple(range(1, masks.dim())), keepdim=True).clamp_min(1e-6)
        error = error * weights
    per_sample = error.mean(dim=tuple(range(1, error.dim())))
    weight = timestep_weight(snr(alphas_cumprod, timesteps), settings, v_prediction)
    if weight is not None:
        per_sample = per_sample * weight.float()
    component = None
    if settings.fourier is not None:
        progress = min(1.0, global_step / settings.max_train_steps) if settings.max_train_steps else 0.0
        component = settings.fourier.weight * fourier_term(pred, target, settings.fourier, global_step, progress)
        per_sample = per_sample + component
    per_sample = per_sample * loss_weight.float()
    return LossResult(per_sample.mean(), per_sample, component)
