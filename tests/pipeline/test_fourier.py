"""The Fourier loss term against an independent numpy reference (float64, explicit loops over bins)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import KilnError
from pipeline.fourier import (
    FOURIER_MODES,
    FOURIER_PRESETS,
    FourierSettings,
    fourier_term,
    frequency_weights,
    spectrum,
)

EPS = 1e-8


def _pair(shape: tuple[int, ...] = (3, 2, 8, 6), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator) * 0.7 + 0.1


# --- the reference, written from the spec without torch.fft ---------------------------------------


def _ref_freq(n: int) -> list[float]:
    # The DFT's signed frequency of index k: k/n up to the Nyquist bin, then negative (k - n)/n.
    return [(k if k <= (n - 1) // 2 else k - n) / n for k in range(n)]


def _ref_weights(height: int, width: int, h: float) -> np.ndarray:
    h = min(max(h, 1.0), 3.0)
    radius = np.zeros((height, width))
    for i, fy in enumerate(_ref_freq(height)):
        for j, fx in enumerate(_ref_freq(width)):
            radius[i, j] = math.sqrt(fy * fy + fx * fx)
    peak = radius.max()
    out = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            r = radius[i, j] / peak if peak > 0 else 0.0
            out[i, j] = 1.0 + (h - 1.0) / (1.0 + math.exp(-4.0 * (r - 0.5)))
    return out


def _ref_spectrum(x: np.ndarray) -> np.ndarray:
    height, width = x.shape[-2:]
    magnitude = np.abs(np.fft.fft2(x, axes=(-2, -1))) + EPS
    std = np.array([sample.std() for sample in x]).reshape(-1, 1, 1, 1)
    return magnitude / math.sqrt(height * width) / (std + EPS)


def _ref_term(pred: torch.Tensor, target: torch.Tensor, norm: str, h: float | None = None) -> np.ndarray:
    a, b = pred.double().numpy(), target.double().numpy()
    diff = _ref_spectrum(a) - _ref_spectrum(b)
    diff = np.abs(diff) if norm == "l1" else diff**2
    if h is None:
        return diff.mean(axis=(1, 2, 3))
    w = _ref_weights(a.shape[-2], a.shape[-1], h)
    return (diff * w).mean(axis=(1, 2, 3)) / w.mean()


def _ref_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    b, c, height, width = x.shape
    hs, ws = height // s, width // s
    out = torch.zeros(b, c, hs, ws, dtype=torch.float64)
    for i in range(hs):
        for j in range(ws):
            out[:, :, i, j] = x[:, :, i * s : (i + 1) * s, j * s : (j + 1) * s].double().mean(dim=(2, 3))
    return out


def _close(actual: torch.Tensor, expected: np.ndarray) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), torch.from_numpy(expected), rtol=1e-4, atol=1e-6)


# --- modes against the reference --------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_basic_matches_reference(norm):
    pred, target = _pair()
    out = fourier_term(pred, target, FourierSettings(mode="basic", norm=norm), global_step=0, progress=0.0)
    assert out.shape == (3,)
    _close(out, _ref_term(pred, target, norm))


def test_spectrum_matches_reference():
    pred, _ = _pair((2, 3, 5, 7))
    _close(spectrum(pred, EPS), _ref_spectrum(pred.double().numpy()))


@pytest.mark.parametrize("size", [(8, 6), (5, 7), (1, 4), (1, 1)])
def test_frequency_weights_match_explicit_loop(size):
    weights = frequency_weights(*size, high_freq_weight=2.0)
    assert weights.shape == size and weights.dtype == torch.float32
    _close(weights, _ref_weights(*size, 2.0))


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("h", [1.5, 2.5])
def test_weighted_matches_reference(norm, h):
    pred, target = _pair((2, 2, 7, 8))
    settings = FourierSettings(mode="weighted", norm=norm, high_freq_weight=h)
    _close(fourier_term(pred, target, settings, 0, 0.0), _ref_term(pred, target, norm, h))


def test_weighted_with_h_1_is_basic():
    pred, target = _pair()
    weighted = fourier_term(pred, target, FourierSettings(mode="weighted", high_freq_weight=1.0), 0, 0.0)
    basic = fourier_term(pred, target, FourierSettings(mode="basic"), 0, 0.0)
    torch.testing.assert_close(weighted, basic)


def test_high_freq_weight_is_clamped_to_1_3():
    torch.testing.assert_close(frequency_weights(6, 6, 10.0), frequency_weights(6, 6, 3.0))
    torch.testing.assert_close(frequency_weights(6, 6, -4.0), torch.ones(6, 6))
    pred, target = _pair()
    high = fourier_term(pred, target, FourierSettings(mode="weighted", high_freq_weight=7.0), 0, 0.0)
    _close(high, _ref_term(pred, target, "l2", 3.0))
    low = fourier_term(pred, target, FourierSettings(mode="weighted", high_freq_weight=0.2), 0, 0.0)
    _close(low, _ref_term(pred, target, "l2", 1.0))


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_multiscale_default_weights_match_reference(norm):
    pred, target = _pair((2, 2, 8, 8))
    settings = FourierSettings(mode="multiscale", norm=norm, scales=(1, 2, 4))
    expected = sum(
        (1 / s) * _ref_term(_ref_pool(pred, s), _ref_pool(target, s), norm) for s in (1, 2, 4)
    ) / (1 + 1 / 2 + 1 / 4)
    _close(fourier_term(pred, target, settings, 0, 0.0), expected)


def test_multiscale_explicit_weights_and_uneven_size():
    pred, target = _pair((2, 1, 9, 7))  # 9x7 pooled by 2 and 3 drops the remainder rows/columns
    settings = FourierSettings(mode="multiscale", norm="l1", scales=[1, 2, 3], scale_weights=[0.5, 0.0, 2.0])
    assert settings.scales == (1, 2, 3)
    expected = (
        0.5 * _ref_term(pred, target, "l1") + 2.0 * _ref_term(_ref_pool(pred, 3), _ref_pool(target, 3), "l1")
    ) / 2.5
    _close(fourier_term(pred, target, settings, 0, 0.0), expected)


def test_adaptive_interpolates_h_from_max_to_min():
    pred, target = _pair()
    adaptive = FourierSettings(mode="adaptive", adaptive_max_weight=2.8, adaptive_min_weight=1.2)
    at_start = fourier_term(pred, target, adaptive, 0, 0.0)
    at_end = fourier_term(pred, target, adaptive, 0, 1.0)
    midway = fourier_term(pred, target, adaptive, 0, 0.25)
    torch.testing.assert_close(at_start, fourier_term(pred, target, FourierSettings(mode="weighted", high_freq_weight=2.8), 0, 0.0))
    torch.testing.assert_close(at_end, fourier_term(pred, target, FourierSettings(mode="weighted", high_freq_weight=1.2), 0, 0.0))
    _close(midway, _ref_term(pred, target, "l2", 2.8 + (1.2 - 2.8) * 0.25))


def test_adaptive_h_is_clamped_too():
    pred, target = _pair()
    adaptive = FourierSettings(mode="adaptive", adaptive_max_weight=5.0, adaptive_min_weight=0.0)
    _close(fourier_term(pred, target, adaptive, 0, 0.0), _ref_term(pred, target, "l2", 3.0))
    _close(fourier_term(pred, target, adaptive, 0, 1.0), _ref_term(pred, target, "l2", 1.0))


# --- warmup, identities, gradients, dtypes ------------------------------------------------------------


@pytest.mark.parametrize("mode", FOURIER_MODES)
def test_warmup_is_zero_before_and_on_at_the_warmup_step(mode):
    pred, target = _pair((2, 2, 8, 8))
    settings = FourierSettings(mode=mode, warmup_steps=100)
    before = fourier_term(pred, target, settings, global_step=99, progress=0.1)
    assert before.shape == (2,) and before.dtype == torch.float32
    assert torch.equal(before, torch.zeros(2))
    at = fourier_term(pred, target, settings, global_step=100, progress=0.1)
    assert (at > 0).all()


@pytest.mark.parametrize("mode", FOURIER_MODES)
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_identical_inputs_give_zero(mode, norm):
    pred, _ = _pair((2, 2, 8, 8))
    out = fourier_term(pred, pred.clone(), FourierSettings(mode=mode, norm=norm), 0, 0.5)
    assert torch.equal(out, torch.zeros(2))


def test_scale_invariance_of_the_normalised_spectrum():
    # Dividing by the sample's std: scaling a prediction does not change its spectrum (up to eps).
    pred, _ = _pair()
    torch.testing.assert_close(spectrum(pred * 5.0, EPS), spectrum(pred, EPS))


@pytest.mark.parametrize("mode", FOURIER_MODES)
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gradient_flows_to_model_pred(mode, norm):
    pred, target = _pair((2, 2, 8, 8))
    pred.requires_grad_(True)
    fourier_term(pred, target, FourierSettings(mode=mode, norm=norm), 0, 0.5).sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_gradient_is_finite_where_the_spectrum_has_zero_bins():
    # A row-constant prediction has exactly-zero FFT bins: |z| at z = 0 must not give a NaN gradient.
    pred = torch.arange(4.0).view(1, 1, 4, 1).expand(1, 1, 4, 4).contiguous().requires_grad_(True)
    target = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    fourier_term(pred, target, FourierSettings(mode="weighted", norm="l1"), 0, 0.0).sum().backward()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", FOURIER_MODES)
def test_half_inputs_are_computed_in_float32(dtype, mode):
    # Values near fp16's max: an FFT in fp16 would overflow summing 256 of them.
    pred, target = _pair((2, 2, 16, 16))
    pred, target = (pred * 20000).clamp(-60000, 60000).to(dtype), (target * 20000).clamp(-60000, 60000).to(dtype)
    settings = FourierSettings(mode=mode)
    out = fourier_term(pred, target, settings, 0, 0.3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, fourier_term(pred.float(), target.float(), settings, 0, 0.3))


# --- presets -----------------------------------------------------------------------------------------------


def test_presets_table():
    assert FOURIER_PRESETS == {
        "conservative": {
            "fourier_weight": 0.01, "fourier_mode": "basic", "fourier_norm": "l2",
            "fourier_high_freq_weight": 1.5, "fourier_warmup_steps": 500,
        },
        "balanced": {
            "fourier_weight": 0.05, "fourier_mode": "weighted", "fourier_norm": "l2",
            "fourier_high_freq_weight": 2.0, "fourier_warmup_steps": 300,
        },
        "aggressive": {
            "fourier_weight": 0.10, "fourier_mode": "multiscale", "fourier_norm": "l1",
            "fourier_scales": [1, 2, 4], "fourier_warmup_steps": 200,
        },
        "super_resolution": {
            "fourier_weight": 0.08, "fourier_mode": "adaptive", "fourier_norm": "l2",
            "fourier_adaptive_max_weight": 3.0, "fourier_adaptive_min_weight": 1.0, "fourier_warmup_steps": 400,
        },
        "fine_detail": {
            "fourier_weight": 0.12, "fourier_mode": "weighted", "fourier_norm": "l1",
            "fourier_high_freq_weight": 2.5, "fourier_warmup_steps": 100,
        },
    }


@pytest.mark.parametrize("name", sorted(FOURIER_PRESETS))
def test_presets_build_valid_settings(name):
    fields = {key.removeprefix("fourier_"): value for key, value in FOURIER_PRESETS[name].items()}
    settings = FourierSettings(**fields)
    assert settings.mode in FOURIER_MODES


# --- errors ------------------------------------------------------------------------------------------------


def test_shape_mismatch_is_an_error_not_a_broadcast():
    with pytest.raises(KilnError, match=r"model_pred has shape \(2, 4, 8, 8\) but target has \(1, 4, 8, 8\)"):
        fourier_term(torch.zeros(2, 4, 8, 8), torch.zeros(1, 4, 8, 8), FourierSettings(), 0, 0.0)


def test_non_4d_input_is_an_error():
    with pytest.raises(KilnError, match=r"model_pred must be \(B, C, H, W\)"):
        fourier_term(torch.zeros(4, 8, 8), torch.zeros(4, 8, 8), FourierSettings(), 0, 0.0)


def test_scale_larger_than_latents_is_an_error():
    settings = FourierSettings(mode="multiscale", scales=(1, 2, 16), warmup_steps=10)
    # Raised during warmup too, so the mistake shows at the first step.
    with pytest.raises(KilnError, match=r"train\.fourier_scales: scale 16 is larger than the latents \(8x32\)"):
        fourier_term(torch.zeros(1, 4, 8, 32), torch.zeros(1, 4, 8, 32), settings, 0, 0.0)


@pytest.mark.parametrize("scales", [(0, 2), (1, 2.5), ()])
def test_bad_scale_values_are_errors(scales):
    with pytest.raises(KilnError, match=r"train\.fourier_scales: "):
        FourierSettings(mode="multiscale", scales=scales)


def test_scale_weights_length_must_match_scales():
    with pytest.raises(KilnError, match=r"train\.fourier_scale_weights: has 2 weights but train\.fourier_scales has 3"):
        FourierSettings(mode="multiscale", scales=(1, 2, 4), scale_weights=(1.0, 0.5))


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [("mode", "spectral", "train.fourier_mode"), ("norm", "l3", "train.fourier_norm"),
     ("weight", -0.1, "train.fourier_weight"), ("warmup_steps", -1, "train.fourier_warmup_steps"),
     ("scale_weights", (0.0, 0.0, 0.0), "train.fourier_scale_weights")],
)
def test_bad_settings_name_their_key(field, value, key):
    with pytest.raises(KilnError, match=key.replace(".", r"\.") + ": "):
        FourierSettings(**{field: value})


def test_progress_outside_0_1_is_an_error():
    pred, target = _pair()
    with pytest.raises(KilnError, match=r"progress must be in \[0, 1\]"):
        fourier_term(pred, target, FourierSettings(mode="adaptive"), 0, 1.5)
