"""A frequency-domain loss term: how far the predicted and target magnitude spectra are apart.

The plain MSE objective is dominated by low frequencies, so fine detail (texture, edges) is learnt late
or blurred. This term compares the 2-D FFT magnitudes of the prediction and the target, optionally
weighting high-frequency bins more, over several resolutions, or with a weight that decays as training
progresses. It returns one value per sample and is NOT multiplied by `fourier_weight`: the caller adds
`weight * F` to its base loss, so per-sample loss weights and logging stay in one place.

Everything is computed in float32 whatever the input dtype: a 64x64 FFT sums 4096 values, which overflows
fp16 and loses most of bf16's precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import KilnError
from pipeline.params import FOURIER_PRESETS as PARAMS_FOURIER_PRESETS

FOURIER_MODES = ("basic", "weighted", "multiscale", "adaptive")
FOURIER_NORMS = ("l1", "l2")

# The bounds of the high-frequency weight h: below 1 would de-emphasise detail (the opposite of the
# point of the term), above 3 the highest bins swamp the rest of the spectrum.
HIGH_FREQ_WEIGHT_RANGE = (1.0, 3.0)

# What each `fourier_config` preset fills in (defined with the params, which merge them).
FOURIER_PRESETS = PARAMS_FOURIER_PRESETS


@dataclass(frozen=True)
class FourierSettings:
    """The train.fourier_* params. Checked on construction, so a bad value fails before training starts."""

    weight: float = 0.0  # fourier_weight; 0 means off
    mode: str = "basic"
    norm: str = "l2"  # "l1" | "l2"
    high_freq_weight: float = 2.0
    scales: tuple[int, ...] = (1, 2, 4)
    scale_weights: tuple[float, ...] | None = None
    warmup_steps: int = 0
    adaptive_max_weight: float = 3.0
    adaptive_min_weight: float = 1.0
    eps: float = 1e-8

    def __post_init__(self) -> None:
        # params.yaml gives lists; store tuples so the settings stay hashable and immutable.
        object.__setattr__(self, "scales", tuple(self.scales))
        if self.scale_weights is not None:
            object.__setattr__(self, "scale_weights", tuple(self.scale_weights))
        if self.mode not in FOURIER_MODES:
            raise KilnError(f"train.fourier_mode: must be one of {', '.join(FOURIER_MODES)}, not {self.mode!r}")
        if self.norm not in FOURIER_NORMS:
            raise KilnError(f"train.fourier_norm: must be one of {', '.join(FOURIER_NORMS)}, not {self.norm!r}")
        if self.weight < 0:
            raise KilnError(f"train.fourier_weight: must be >= 0, not {self.weight}")
        if self.warmup_steps < 0:
            raise KilnError(f"train.fourier_warmup_steps: must be >= 0, not {self.warmup_steps}")
        if not self.eps > 0:
            raise KilnError(f"train.fourier_eps: must be > 0, not {self.eps}")
        if not self.scales:
            raise KilnError("train.fourier_scales: needs at least one scale")
        for scale in self.scales:
            if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
                raise KilnError(f"train.fourier_scales: each scale must be an integer >= 1, not {scale!r}")
        if self.scale_weights is not None:
            if len(self.scale_weights) != len(self.scales):
                raise KilnError(
                    f"train.fourier_scale_weights: has {len(self.scale_weights)} weights but train.fourier_scales "
                    f"has {len(self.scales)} scales; give one weight per scale"
                )
            if any(w < 0 for w in self.scale_weights) or not sum(self.scale_weights) > 0:
                raise KilnError(
                    f"train.fourier_scale_weights: must be >= 0 with a positive sum, not {list(self.scale_weights)}"
                )


def frequency_weights(
    height: int, width: int, high_freq_weight: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """w = 1 + (h - 1) * sigmoid(4 (r - 0.5)) per FFT bin, (H, W) float32, in torch.fft.fft2's bin order.

    r is the bin's radial frequency sqrt(fy^2 + fx^2) divided by its maximum, so r is in [0, 1]; h is
    clamped to [1, 3]. At h = 1 every weight is 1 (the basic term).
    """
    h = min(max(float(high_freq_weight), HIGH_FREQ_WEIGHT_RANGE[0]), HIGH_FREQ_WEIGHT_RANGE[1])
    fy = torch.fft.fftfreq(height, device=device, dtype=torch.float32)
    fx = torch.fft.fftfreq(width, device=device, dtype=torch.float32)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    # A 1x1 spectrum is only the DC bin (max radius 0): it is radius 0, not 0/0.
    peak = radius.max()
    r = radius / peak if peak > 0 else radius
    return 1.0 + (h - 1.0) * torch.sigmoid(4.0 * (r - 0.5))


def spectrum(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The normalised FFT magnitude of (B, C, H, W) x, float32, same shape.

    (|fft2(x)| + eps) / sqrt(H W) / (std_b + eps), with std_b the population std of sample b over C, H, W.
    sqrt(H W) makes the spectrum's scale independent of resolution (Parseval); dividing by the sample's
    std makes it independent of the latents' overall magnitude, so the term measures shape, not scale.
    """
    _check_4d(x, "spectrum input")
    x = x.float()
    height, width = x.shape[-2:]
    magnitude = torch.fft.fft2(x, dim=(-2, -1)).abs() + eps
    # correction=0: the population std, which is defined (0, not NaN) for a single element.
    std = x.std(dim=(1, 2, 3), correction=0, keepdim=True)
    return magnitude / math.sqrt(height * width) / (std + eps)


def fourier_term(
    model_pred: torch.Tensor, target: torch.Tensor, settings: FourierSettings, global_step: int, progress: float
) -> torch.Tensor:
    """F per sample, shape (B,) float32, NOT multiplied by settings.weight.

    progress = global_step / max_train_steps, in [0, 1]; it only matters to the adaptive mode.
    Zero before settings.warmup_steps.
    """
    _check_4d(model_pred, "model_pred")
    _check_4d(target, "target")
    if model_pred.shape != target.shape:
        raise KilnError(
            f"fourier loss: model_pred has shape {tuple(model_pred.shape)} but target has "
            f"{tuple(target.shape)}; they must match"
        )
    if not 0.0 <= progress <= 1.0:
        raise KilnError(f"fourier loss: training progress must be in [0, 1], not {progress}")
    batch, _, height, width = model_pred.shape
    # Checked here too (not only once the warmup is over), so a bad scale fails at the first step.
    if settings.mode == "multiscale":
        for scale in settings.scales:
            if scale > height or scale > width:
                raise KilnError(
                    f"train.fourier_scales: scale {scale} is larger than the latents ({height}x{width})"
                )
    if global_step < settings.warmup_steps:
        return torch.zeros(batch, dtype=torch.float32, device=model_pred.device)

    if settings.mode == "basic":
        return _spectral_distance(model_pred, target, settings, high_freq_weight=None)
    if settings.mode == "weighted":
        return _spectral_distance(model_pred, target, settings, high_freq_weight=settings.high_freq_weight)
    if settings.mode == "adaptive":
        # Emphasise detail early, relax towards the plain spectrum as training converges.
        h = settings.adaptive_max_weight + (settings.adaptive_min_weight - settings.adaptive_max_weight) * progress
        return _spectral_distance(model_pred, target, settings, high_freq_weight=h)
    return _multiscale(model_pred, target, settings)


def _check_4d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise KilnError(f"fourier loss: {name} must be (B, C, H, W), got shape {tuple(x.shape)}")


def _spectral_distance(
    model_pred: torch.Tensor, target: torch.Tensor, settings: FourierSettings, high_freq_weight: float | None
) -> torch.Tensor:
    """Mean l1 / l2 difference of the two spectra per sample, optionally frequency-weighted."""
    diff = spectrum(model_pred, settings.eps) - spectrum(target, settings.eps)
    diff = diff.abs() if settings.norm == "l1" else diff.square()
    if high_freq_weight is None:
        return diff.mean(dim=(1, 2, 3))
    weights = frequency_weights(diff.shape[-2], diff.shape[-1], high_freq_weight, device=diff.device)
    # Divided by mean(w) so the weights redistribute emphasis across bins without changing the overall
    # scale: at h = 1 this is exactly the basic term, and fourier_weight keeps its meaning across modes.
    return (diff * weights).mean(dim=(1, 2, 3)) / weights.mean()


def _multiscale(model_pred: torch.Tensor, target: torch.Tensor, settings: FourierSettings) -> torch.Tensor:
    """sum_s w_s F_s / sum_s w_s, F_s the basic term on s x s average-pooled tensors; w_s = 1/s by default."""
    scale_weights: Sequence[float] = settings.scale_weights or [1.0 / s for s in settings.scales]
    total = torch.zeros(model_pred.shape[0], dtype=torch.float32, device=model_pred.device)
    for scale, scale_weight in zip(settings.scales, scale_weights, strict=True):
        pred_s, target_s = model_pred.float(), target.float()
        if scale > 1:
            pred_s, target_s = F.avg_pool2d(pred_s, scale), F.avg_pool2d(target_s, scale)
        total = total + scale_weight * _spectral_distance(pred_s, target_s, settings, high_freq_weight=None)
    return total / sum(scale_weights)
