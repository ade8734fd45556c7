"""The training losses (pipeline.losses) against an independent float64 reference written from the spec.

The schedule is a real diffusers DDPMScheduler's (SD 1.x's scaled_linear betas); the references are
explicit Python loops / numpy over its alphas_cumprod, never calls into pipeline.losses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from pipeline.errors import ParamsError
from pipeline.fourier import FOURIER_PRESETS, FourierSettings, fourier_term
from pipeline.losses import LossSettings, compute, elementwise, huber_threshold, snr
from pipeline.objective import DiffusionObjective
from pipeline.params import validate_params

SCHEDULER = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
ALPHAS = SCHEDULER.alphas_cumprod  # float32, as the trainer gets it
ZERO_SNR_ALPHAS = DDPMScheduler(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
).alphas_cumprod
T = 1000
TIMESTEPS = torch.tensor([0, 1, 250, 500, 999])


def _settings(max_train_steps: int | None = None, **train: object) -> LossSettings:
    """LossSettings the way the trainer builds them: from validated params."""
    return LossSettings.from_params(validate_params({"train": train}).train, max_train_steps)


def _pair(batch: int = 5, shape: tuple[int, ...] = (2, 4, 4), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Scaled so the errors fall on both sides of 1 (EveryDream2's Huber delta) and of huber_c.
    return torch.randn(batch, *shape, generator=generator) * 1.5, torch.randn(batch, *shape, generator=generator)


def _ones(batch: int) -> torch.Tensor:
    return torch.ones(batch)


# --- the reference -----------------------------------------------------------------------------------------


def _alpha_bar(t: int, alphas: torch.Tensor = ALPHAS) -> float:
    return float(alphas[t])


def _ref_snr(t: int, alphas: torch.Tensor = ALPHAS) -> float:
    a = _alpha_bar(t, alphas)
    return a / (1.0 - a)


def _ref_huber_c(t: int, schedule: str, c: float, alphas: torch.Tensor = ALPHAS) -> float:
    if schedule == "constant":
        return c
    if schedule == "exponential":
        return math.exp(-(-math.log(c) / T) * t)
    a = _alpha_bar(t, alphas)
    sigma = math.inf if a == 0 else math.sqrt((1.0 - a) / a)
    return (1.0 - c) / (1.0 + sigma) ** 2 + c


def _ref_torch_huber(e: float) -> float:
    # torch.nn.functional.huber_loss with delta 1, as EveryDream2 uses it.
    return 0.5 * e * e if abs(e) < 1.0 else abs(e) - 0.5


def _ref_element(e: float, kind: str, t: int, c: float = 0.1, schedule: str = "snr") -> float:
    if kind in ("mse", "l2"):
        return e * e
    if kind == "l1":
        return abs(e)
    if kind in ("huber", "smooth_l1"):
        ct = _ref_huber_c(t, schedule, c)
        root = math.sqrt(e * e + ct * ct) - ct
        return 2.0 * ct * root if kind == "huber" else 2.0 * root
    share = t / (T - 1)  # 0 at timestep 0, 1 at timestep 999
    if kind == "huber_mse":
        share = 1.0 - share
    return (1.0 - share) * e * e + share * _ref_torch_huber(e)


def _ref_per_sample(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, kind: str, **kw) -> np.ndarray:
    out = []
    for b in range(pred.shape[0]):
        errors = (pred[b].double() - target[b].double()).flatten().tolist()
        out.append(sum(_ref_element(e, kind, int(timesteps[b]), **kw) for e in errors) / len(errors))
    return np.array(out)


def _ref_min_snr(t: int, gamma: float, v: bool, alphas: torch.Tensor = ALPHAS) -> float:
    s = _ref_snr(t, alphas)
    if v:
        return min(s, gamma) / (s + 1.0)
    return 1.0 if s == 0 else min(s, gamma) / s


def _ref_debiased(t: int, v: bool) -> float:
    s = min(_ref_snr(t), 1000.0)
    return 1.0 / (s + 1.0) if v else 1.0 / math.sqrt(s)


def _ref_fourier_basic(pred: torch.Tensor, target: torch.Tensor, norm: str, eps: float = 1e-8) -> np.ndarray:
    """The basic Fourier term: mean distance of the normalised magnitude spectra, per sample."""
    out = []
    for a, b in zip(pred.double().numpy(), target.double().numpy(), strict=True):
        height, width = a.shape[-2:]
        spectra = [(np.abs(np.fft.fft2(x)) + eps) / math.sqrt(height * width) / (x.std() + eps) for x in (a, b)]
        diff = spectra[0] - spectra[1]
        out.append((np.abs(diff) if norm == "l1" else diff**2).mean())
    return np.array(out)


def _close(actual: torch.Tensor, expected, **kw) -> None:
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, **({"rtol": 1e-5, "atol": 1e-7} | kw))


# --- defaults ----------------------------------------------------------------------------------------------


def test_defaults():
    cfg = validate_params({"train": {}}).train
    assert (cfg.loss_type, cfg.huber_c, cfg.huber_schedule) == ("mse", 0.1, "snr")
    assert (cfg.min_snr_gamma, cfg.debiased_estimation_loss, cfg.masked_loss, cfg.fourier_config) == (None, False, False, None)
    assert LossSettings.from_params(cfg, 100) == LossSettings(max_train_steps=100)
    assert LossSettings() == LossSettings("mse", 0.1, "snr", None, False, None, None)
    # loss_type fourier without a preset takes the fourier_* defaults.
    assert _settings(loss_type="fourier").fourier == FourierSettings(
        weight=0.05, mode="weighted", norm="l2", high_freq_weight=2.0, scales=(1, 2, 4), scale_weights=None,
        warmup_steps=300, adaptive_max_weight=3.0, adaptive_min_weight=1.0,
    )


def test_default_loss_is_the_plain_per_sample_mse():
    pred, target = _pair()
    result = compute(pred, target, TIMESTEPS, ALPHAS, LossSettings(), _ones(5), v_prediction=False)
    expected = _ref_per_sample(pred, target, TIMESTEPS, "mse")
    _close(result.per_sample, expected)
    _close(result.loss, expected.mean())
    assert result.per_sample.shape == (5,) and result.loss.shape == () and result.fourier_component is None


# --- element-wise losses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["mse", "l2", "l1"])
def test_mse_l2_l1_match_reference(loss_type):
    pred, target = _pair()
    settings = _settings(loss_type=loss_type)
    assert settings.loss_type == ("mse" if loss_type == "l2" else loss_type)  # l2 is an alias of mse
    result = compute(pred, target, TIMESTEPS, ALPHAS, settings, _ones(5), v_prediction=False)
    _close(result.per_sample, _ref_per_sample(pred, target, TIMESTEPS, loss_type))


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("c", [0.1, 0.35])
def test_huber_and_smooth_l1_match_kohya(loss_type, schedule, c):
    pred, target = _pair()
    settings = _settings(loss_type=loss_type, huber_c=c, huber_schedule=schedule)
    result = compute(pred, target, TIMESTEPS, ALPHAS, settings, _ones(5), v_prediction=False)
    _close(result.per_sample, _ref_per_sample(pred, target, TIMESTEPS, loss_type, c=c, schedule=schedule))


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_threshold_matches_reference_at_every_timestep(schedule):
    c = 0.1
    everything = torch.arange(T)
    expected = [_ref_huber_c(t, schedule, c) for t in range(T)]
    torch.testing.assert_close(huber_threshold(everything, schedule, c, ALPHAS), torch.tensor(expected, dtype=torch.float64))


def test_huber_threshold_endpoints():
    c = 0.2
    # exponential: 1 at t = 0, √c halfway, c at t = T.
    exponential = huber_threshold(torch.tensor([0, 500, 1000]), "exponential", c, ALPHAS)
    assert exponential[0].item() == 1.0
    assert exponential[1].item() == pytest.approx(math.sqrt(c), rel=1e-12)
    assert exponential[2].item() == pytest.approx(c, rel=1e-12)
    # snr: near 1 at low noise, exactly c where ᾱ = 0 (σ infinite), decreasing in between.
    zero = huber_threshold(torch.arange(T), "snr", c, ZERO_SNR_ALPHAS)
    assert ZERO_SNR_ALPHAS[-1].item() == 0.0
    assert zero[-1].item() == pytest.approx(c, abs=1e-15) and torch.isfinite(zero).all()
    assert zero[0].item() == pytest.approx(_ref_huber_c(0, "snr", c, ZERO_SNR_ALPHAS), rel=1e-12) and zero[0] > 0.9
    assert (zero[1:] <= zero[:-1]).all()
    assert (huber_threshold(torch.arange(T), "constant", c, ALPHAS) == c).all()


def test_huber_is_mse_for_small_errors_and_linear_for_large():
    # kohya's 2c(√(e² + c²) − c): ≈ e² for |e| ≪ c, ≈ 2c|e| − 2c² for |e| ≫ c.
    target = torch.zeros(2, 1, 1, 1)
    pred = torch.tensor([1e-3, 100.0]).view(2, 1, 1, 1)
    settings = LossSettings(loss_type="huber", huber_c=0.1, huber_schedule="constant")
    out = elementwise(pred, target, torch.tensor([3, 3]), settings, ALPHAS).flatten()
    # (float32 √(e² + c²) − c cancels: about 3 significant digits are left at |e| = c/100.)
    assert out[0].item() == pytest.approx(1e-6, rel=1e-2)
    assert out[1].item() == pytest.approx(2 * 0.1 * 100 - 2 * 0.1**2, rel=1e-5)


def _exact_pair() -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Errors exactly representable (multiples of 1/8), on both sides of EveryDream2's Huber delta 1."""
    errors = [-3.0, -1.25, -1.0, -0.5, 0.125, 0.75, 1.5, 4.0]
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(-16, 16, (3, 2, 2, 2), generator=generator).float() / 8
    pred = target + torch.tensor(errors).view(1, 2, 2, 2)
    return pred, target, errors


@pytest.mark.parametrize("loss_type", ["mse_huber", "huber_mse"])
def test_everydream_blend_endpoints_are_exact(loss_type):
    pred, target, errors = _exact_pair()
    timesteps = torch.tensor([0, 999, 999])
    out = elementwise(pred, target, timesteps, _settings(loss_type=loss_type), ALPHAS)
    mse = torch.tensor([e * e for e in errors]).view(2, 2, 2)
    huber = torch.tensor([_ref_torch_huber(e) for e in errors]).view(2, 2, 2)
    first, last = (mse, huber) if loss_type == "mse_huber" else (huber, mse)
    assert torch.equal(out[0], first)  # timestep 0
    assert torch.equal(out[1], last) and torch.equal(out[2], last)  # timestep 999


@pytest.mark.parametrize("loss_type", ["mse_huber", "huber_mse"])
def test_everydream_blend_is_linear_in_the_timestep(loss_type):
    pred, target, _ = _exact_pair()
    timesteps = torch.tensor([0, 500, 999])
    settings = _settings(loss_type=loss_type)
    result = compute(pred, target, timesteps, ALPHAS, settings, _ones(3), v_prediction=False)
    _close(result.per_sample, _ref_per_sample(pred, target, timesteps, loss_type))
    # The midpoint 499.5 lies between two timesteps: their mean is exactly half MSE, half Huber.
    same = pred[:1].expand(2, -1, -1, -1), target[:1].expand(2, -1, -1, -1)
    middle = compute(*same, torch.tensor([499, 500]), ALPHAS, settings, _ones(2), v_prediction=False).loss
    errors = (pred[0] - target[0]).double().flatten().tolist()
    mse = float(np.mean([e * e for e in errors]))
    huber = float(np.mean([_ref_torch_huber(e) for e in errors]))
    assert mse != pytest.approx(huber)
    assert middle.item() == pytest.approx((mse + huber) / 2, rel=1e-6)
    # mse_huber at t is huber_mse at 999 − t.
    other = _settings(loss_type="huber_mse" if loss_type == "mse_huber" else "mse_huber")
    torch.testing.assert_close(
        elementwise(pred, target, timesteps, settings, ALPHAS), elementwise(pred, target, 999 - timesteps, other, ALPHAS)
    )


# --- timestep weightings ---------------------------------------------------------------------------------


def test_snr_matches_diffusers():
    everything = torch.arange(T)
    torch.testing.assert_close(snr(ALPHAS, everything).float(), compute_snr(SCHEDULER, everything))
    assert snr(ALPHAS, everything).dtype == torch.float64
    assert snr(ZERO_SNR_ALPHAS, torch.tensor([999])).item() == 0.0


@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("v", [False, True])
def test_min_snr_gamma_matches_hang_et_al(gamma, v):
    pred, target = _pair()
    timesteps = torch.tensor([0, 100, 400, 700, 999])  # SNR from ≈ 1175 down to ≈ 0.005: both sides of γ
    snrs = [_ref_snr(int(t)) for t in timesteps]
    assert max(snrs) > gamma > min(snrs)
    result = compute(pred, target, timesteps, ALPHAS, _settings(min_snr_gamma=gamma), _ones(5), v_prediction=v)
    weights = np.array([_ref_min_snr(int(t), gamma, v) for t in timesteps])
    _close(result.per_sample, _ref_per_sample(pred, target, timesteps, "mse") * weights)


@pytest.mark.parametrize("v", [False, True])
def test_debiased_estimation_matches_kohya(v):
    pred, target = _pair()
    timesteps = torch.tensor([0, 10, 300, 600, 999])
    assert _ref_snr(0) > 1000  # timestep 0 exercises the clamp at 1000
    result = compute(pred, target, timesteps, ALPHAS, _settings(debiased_estimation_loss=True), _ones(5), v_prediction=v)
    weights = np.array([_ref_debiased(int(t), v) for t in timesteps])
    _close(result.per_sample, _ref_per_sample(pred, target, timesteps, "mse") * weights)


@pytest.mark.parametrize("v", [False, True])
def test_min_snr_and_debiased_multiply(v):
    pred, target = _pair()
    settings = _settings(loss_type="l1", min_snr_gamma=5.0, debiased_estimation_loss=True)
    result = compute(pred, target, TIMESTEPS, ALPHAS, settings, _ones(5), v_prediction=v)
    weights = np.array([_ref_min_snr(int(t), 5.0, v) * _ref_debiased(int(t), v) for t in TIMESTEPS])
    _close(result.per_sample, _ref_per_sample(pred, target, TIMESTEPS, "l1") * weights)


def test_weightings_are_finite_at_a_zero_terminal_snr_step():
    pred, target = _pair(batch=2)
    timesteps = torch.tensor([998, 999])  # SNR ≈ 2e-7, then exactly 0
    base = _ref_per_sample(pred, target, timesteps, "mse")
    min_snr = _settings(min_snr_gamma=5.0)
    debiased = _settings(debiased_estimation_loss=True)
    eps = compute(pred, target, timesteps, ZERO_SNR_ALPHAS, min_snr, _ones(2), v_prediction=False).per_sample
    _close(eps, base)  # min(SNR, γ)/SNR → 1 as SNR → 0
    v = compute(pred, target, timesteps, ZERO_SNR_ALPHAS, min_snr, _ones(2), v_prediction=True).per_sample
    _close(v, base * np.array([_ref_min_snr(998, 5.0, True, ZERO_SNR_ALPHAS), 0.0]), atol=1e-12)
    assert v[1].item() == 0.0
    # debiased: 1/(SNR + 1) is 1 at SNR 0 for v; ε's 1/√SNR is held finite.
    v = compute(pred, target, timesteps, ZERO_SNR_ALPHAS, debiased, _ones(2), v_prediction=True).per_sample
    _close(v, base * np.array([1 / (1 + _ref_snr(998, ZERO_SNR_ALPHAS)), 1.0]))
    eps = compute(pred, target, timesteps, ZERO_SNR_ALPHAS, debiased, _ones(2), v_prediction=False)
    assert torch.isfinite(eps.per_sample).all() and torch.isfinite(eps.loss) and (eps.per_sample > 0).all()


def test_objective_passes_its_prediction_type_and_schedule():
    pred, target = _pair()
    for prediction, v in (("epsilon", False), ("v_prediction", True)):
        objective = DiffusionObjective.from_scheduler(SCHEDULER, prediction, loss=_settings(min_snr_gamma=5.0))
        batch = objective.with_noise(torch.zeros_like(target), TIMESTEPS, target)
        result = objective.compute_loss(pred, batch, _ones(5))
        weights = np.array([_ref_min_snr(int(t), 5.0, v) for t in TIMESTEPS])
        _close(result.per_sample, _ref_per_sample(pred, batch.target, TIMESTEPS, "mse") * weights)


# --- masks and per-sample weights ---------------------------------------------------------------------------


def _mask(batch: int = 5, size: int = 4, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, 1, size, size, generator=generator)
    mask[mask < 0.3] = 0.0  # soft, with holes
    return mask


@pytest.mark.parametrize("loss_type", ["mse", "l1", "huber", "mse_huber"])
def test_masked_loss_is_the_mask_weighted_mean(loss_type):
    pred, target = _pair()
    mask = _mask()
    result = compute(pred, target, TIMESTEPS, ALPHAS, _settings(loss_type=loss_type), _ones(5), False, masks=mask)
    expected = []
    for b in range(5):
        channels, height, width = pred.shape[1:]
        weighted = total = 0.0
        for ch in range(channels):
            for i in range(height):
                for j in range(width):
                    e = float(pred[b, ch, i, j].double() - target[b, ch, i, j].double())
                    m = float(mask[b, 0, i, j])
                    weighted += m * _ref_element(e, loss_type, int(TIMESTEPS[b]))
                    total += m
        expected.append(weighted / total)
    _close(result.per_sample, expected)


@pytest.mark.parametrize("loss_type", ["mse", "smooth_l1", "huber_mse"])
def test_mask_of_ones_is_no_mask_and_a_uniform_error_keeps_its_scale(loss_type):
    pred, target = _pair()
    settings = _settings(loss_type=loss_type)
    plain = compute(pred, target, TIMESTEPS, ALPHAS, settings, _ones(5), False)
    ones = compute(pred, target, TIMESTEPS, ALPHAS, settings, _ones(5), False, masks=torch.ones(5, 1, 4, 4))
    torch.testing.assert_close(ones.per_sample, plain.per_sample)
    torch.testing.assert_close(ones.loss, plain.loss)
    # Normalised to mean 1: scaling the mask changes nothing, and a uniform error gives the unmasked loss.
    mask = _mask()
    torch.testing.assert_close(
        compute(pred, target, TIMESTEPS, ALPHAS, settings, _ones(5), False, masks=mask * 7).per_sample,
        compute(pred, target, TIMESTEPS, ALPHAS, settings, _ones(5), False, masks=mask).per_sample,
    )
    uniform = target + 0.8
    torch.testing.assert_close(
        compute(uniform, target, TIMESTEPS, ALPHAS, settings, _ones(5), False, masks=mask).per_sample,
        compute(uniform, target, TIMESTEPS, ALPHAS, settings, _ones(5), False).per_sample,
    )


def test_an_all_zero_mask_gives_zero_not_nan():
    pred, target = _pair(batch=2)
    mask = torch.ones(2, 1, 4, 4)
    mask[1] = 0
    result = compute(pred, target, TIMESTEPS[:2], ALPHAS, LossSettings(), _ones(2), False, masks=mask)
    assert result.per_sample[1].item() == 0.0 and torch.isfinite(result.loss)


def test_loss_weight_multiplies_each_sample_after_the_mean():
    pred, target = _pair()
    loss_weight = torch.tensor([1.0, 0.5, 2.0, 0.0, 3.0])
    settings = _settings(loss_type="l1", min_snr_gamma=5.0)
    mask = _mask()
    unweighted = compute(pred, target, TIMESTEPS, ALPHAS, settings, _ones(5), False, masks=mask).per_sample
    result = compute(pred, target, TIMESTEPS, ALPHAS, settings, loss_weight, False, masks=mask)
    _close(result.per_sample, unweighted.double().numpy() * loss_weight.double().numpy())
    # The batch loss is the plain mean of the weighted samples (not normalised by the weights' sum).
    _close(result.loss, (unweighted.double().numpy() * loss_weight.double().numpy()).mean())
    expected = _ref_per_sample(pred, target, TIMESTEPS, "mse") * np.array([_ref_min_snr(int(t), 5.0, False) for t in TIMESTEPS])
    plain = compute(pred, target, TIMESTEPS, ALPHAS, _settings(min_snr_gamma=5.0), loss_weight, False)
    _close(plain.per_sample, expected * loss_weight.double().numpy())


def test_half_precision_inputs_are_computed_in_float32():
    pred, target = _pair()
    for dtype in (torch.float16, torch.bfloat16):
        low_pred, low_target = pred.to(dtype), target.to(dtype)
        result = compute(low_pred, low_target, TIMESTEPS, ALPHAS, _settings(loss_type="huber"), _ones(5), False)
        _close(result.per_sample, _ref_per_sample(low_pred.float(), low_target.float(), TIMESTEPS, "huber"))


# --- the Fourier loss type ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_fourier_is_the_norms_base_loss_plus_weighted_term_after_warmup(norm):
    pred, target = _pair(shape=(3, 8, 6))
    settings = _settings(100, loss_type="fourier", fourier_mode="basic", fourier_norm=norm, fourier_weight=0.3, fourier_warmup_steps=10)
    base = _ref_per_sample(pred, target, TIMESTEPS, "mse" if norm == "l2" else "l1")
    term = 0.3 * _ref_fourier_basic(pred, target, norm)
    assert (term > 0).all()

    before = compute(pred, target, TIMESTEPS, ALPHAS, settings, _ones(5), False, global_step=9)
    _close(before.per_sample, base)
    assert before.fourier_component.shape == (5,) and (before.fourier_component == 0).all()

    after = compute(pred, target, TIMESTEPS, ALPHAS, settings, _ones(5), False, global_step=10)
    _close(after.fourier_component, term, rtol=1e-4, atol=1e-6)
    _close(after.per_sample, base + term, rtol=1e-4, atol=1e-6)
    _close(after.loss, (base + term).mean(), rtol=1e-4, atol=1e-6)


def test_fourier_order_timestep_weight_on_base_then_loss_weight_on_all():
    pred, target = _pair(shape=(3, 8, 6))
    settings = _settings(100, loss_type="fourier", fourier_mode="basic", fourier_weight=0.2, fourier_warmup_steps=0, min_snr_gamma=5.0)
    loss_weight = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.5])
    result = compute(pred, target, TIMESTEPS, ALPHAS, settings, loss_weight, False, global_step=50)
    snr_weight = np.array([_ref_min_snr(int(t), 5.0, False) for t in TIMESTEPS])
    term = 0.2 * _ref_fourier_basic(pred, target, "l2")
    base = _ref_per_sample(pred, target, TIMESTEPS, "mse")
    _close(result.per_sample, (base * snr_weight + term) * loss_weight.double().numpy(), rtol=1e-4, atol=1e-6)
    _close(result.fourier_component, term, rtol=1e-4, atol=1e-6)  # w·F, before the loss weight


def test_fourier_progress_is_step_over_max_train_steps():
    pred, target = _pair(shape=(3, 8, 8))
    train = {"loss_type": "fourier", "fourier_mode": "adaptive", "fourier_weight": 0.5, "fourier_warmup_steps": 0}
    for max_steps, step, progress in ((200, 50, 0.25), (200, 200, 1.0), (200, 260, 1.0), (None, 50, 0.0)):
        settings = _settings(max_steps, **train)
        result = compute(pred, target, TIMESTEPS, ALPHAS, settings, _ones(5), False, global_step=step)
        expected = 0.5 * fourier_term(pred, target, settings.fourier, step, progress)
        torch.testing.assert_close(result.fourier_component, expected)
    early = compute(pred, target, TIMESTEPS, ALPHAS, _settings(200, **train), _ones(5), False, global_step=0)
    late = compute(pred, target, TIMESTEPS, ALPHAS, _settings(200, **train), _ones(5), False, global_step=200)
    assert not torch.allclose(early.fourier_component, late.fourier_component)  # the adaptive weight moved


def test_fourier_preset_fills_keys_and_explicit_keys_override():
    settings = _settings(loss_type="fourier", fourier_config="aggressive")
    assert settings.fourier == FourierSettings(
        weight=0.10, mode="multiscale", norm="l1", scales=(1, 2, 4), warmup_steps=200,
        high_freq_weight=2.0, adaptive_max_weight=3.0, adaptive_min_weight=1.0,  # not in the preset: defaults
    )
    overridden = _settings(loss_type="fourier", fourier_config="aggressive", fourier_weight=0.5, fourier_norm="l2", fourier_scales=[1, 2])
    assert overridden.fourier == FourierSettings(weight=0.5, mode="multiscale", norm="l2", scales=(1, 2), warmup_steps=200)
    # The preset's norm picks the base loss: aggressive's l1 is L1, the override's l2 is MSE.
    pred, target = _pair(shape=(2, 8, 8))
    for current, kind in ((settings, "l1"), (overridden, "mse")):
        before = compute(pred, target, TIMESTEPS, ALPHAS, current, _ones(5), False, global_step=0)
        _close(before.per_sample, _ref_per_sample(pred, target, TIMESTEPS, kind))


@pytest.mark.parametrize("name", sorted(FOURIER_PRESETS))
def test_every_preset_reaches_the_loss_settings(name):
    fourier = _settings(loss_type="fourier", fourier_config=name).fourier
    for key, value in FOURIER_PRESETS[name].items():
        got = getattr(fourier, key.removeprefix("fourier_"))
        assert got == (tuple(value) if isinstance(value, list) else value), key


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"loss_type": "l3"}, r"train\.loss_type: Input should be 'mse', 'l2', 'l1', 'huber', 'smooth_l1', 'mse_huber', 'huber_mse' or 'fourier' \(got 'l3'\)"),
        ({"huber_c": 0}, r"train\.huber_c: Input should be greater than 0"),
        ({"huber_c": 1.5}, r"train\.huber_c: Input should be less than or equal to 1"),
        ({"huber_schedule": "linear"}, r"train\.huber_schedule: Input should be 'constant', 'exponential' or 'snr'"),
        ({"min_snr_gamma": 0}, r"train\.min_snr_gamma: Input should be greater than 0"),
        ({"fourier_config": "nope"}, r"train\.fourier_config: Input should be 'conservative'"),
        ({"fourier_norm": "l3"}, r"train\.fourier_norm: Input should be 'l1' or 'l2'"),
        ({"fourier_mode": "fast"}, r"train\.fourier_mode: Input should be 'basic'"),
        ({"fourier_weight": -1}, r"train\.fourier_weight: Input should be greater than or equal to 0"),
        ({"fourier_warmup_steps": -1}, r"train\.fourier_warmup_steps: Input should be greater than or equal to 0"),
        ({"fourier_scales": [0, 2]}, r"train\.fourier_scales: must be one or more integers ≥ 1"),
        ({"fourier_scale_weights": [1.0]}, r"train\.fourier_scale_weights: needs one weight per scale"),
    ],
)
def test_bad_loss_params_name_their_key(train, message):
    with pytest.raises(ParamsError, match=message):
        validate_params({"train": train})
