"""Offset, pyramid and input-perturbation noise, and zero-terminal-SNR betas, against independent maths.

Exact checks replay the step generator's draws in the order the spec gives them and recompute the result
from the formulas (with different torch ops where there is a choice); statistical checks use large seeded
batches, so they are deterministic.
"""

import logging
import math

import pytest
import torch
from diffusers import DDPMScheduler

from pipeline.errors import KilnError, ParamsError
from pipeline.noise import (
    NoiseSettings,
    input_perturbation,
    offset_noise,
    pyramid_noise,
    training_noise,
    zero_terminal_snr,
)
from pipeline.objective import DiffusionObjective
from pipeline.params import validate_params

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def uniform(generator):
    return torch.rand((), generator=generator, dtype=torch.float64).item()


def train(**keys):
    return validate_params({"train": keys}).train


def settings(**keys):
    return NoiseSettings.from_params(train(**keys))


def same_next_draw(a, b):
    """Both generators are at the same point of their stream."""
    return torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


# --- defaults and params ----------------------------------------------------------------------------


def test_defaults_add_plain_gaussian_noise():
    cfg = train()
    assert cfg.noise_offset == 0 and not cfg.noise_offset_random_strength and cfg.adaptive_noise_scale is None
    assert cfg.multires_noise_iterations == 0 and cfg.multires_noise_discount == 0.3 and cfg.pyramid_noise_discount is None
    assert cfg.ip_noise_gamma == 0 and not cfg.ip_noise_gamma_random_strength and not cfg.zero_terminal_snr
    assert NoiseSettings.from_params(cfg) == NoiseSettings()
    latents = torch.randn(2, 4, 8, 8)
    g, replay = gen(), gen()
    noise = training_noise(latents, NoiseSettings(), g)
    assert torch.equal(noise, torch.randn(2, 4, 8, 8, generator=replay))
    assert torch.equal(input_perturbation(noise, NoiseSettings(), g), noise)
    assert same_next_draw(g, replay)  # nothing else drawn


def test_params_and_aliases():
    assert settings(zero_frequency_noise_ratio=0.1) == settings(noise_offset=0.1)
    assert settings(noise_offset=0.1).offset == 0.1
    assert train(enable_zero_terminal_snr=True).zero_terminal_snr
    full = settings(
        noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=-0.02, multires_noise_iterations=6,
        multires_noise_discount=0.4, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
    )
    assert full == NoiseSettings(0.05, True, -0.02, 6, 0.4, 0.1, True)
    # EveryDream2's pyramid_noise_discount: 10 levels at that discount, or multires_noise_iterations' count.
    assert (settings(pyramid_noise_discount=0.8).multires_iterations, settings(pyramid_noise_discount=0.8).multires_discount) == (10, 0.8)
    both = settings(pyramid_noise_discount=0.8, multires_noise_iterations=4)
    assert (both.multires_iterations, both.multires_discount) == (4, 0.8)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"noise_offset": -0.1}, "train.noise_offset: Input should be greater than or equal to 0"),
        ({"zero_frequency_noise_ratio": -0.1}, "train.zero_frequency_noise_ratio: Input should be greater than or equal to 0"),
        ({"multires_noise_iterations": -1}, "train.multires_noise_iterations: Input should be greater than or equal to 0"),
        ({"multires_noise_discount": 0}, "train.multires_noise_discount: Input should be greater than 0"),
        ({"multires_noise_discount": 1.5}, "train.multires_noise_discount: Input should be less than or equal to 1"),
        ({"pyramid_noise_discount": 1.5}, "train.pyramid_noise_discount: Input should be less than or equal to 1"),
        ({"ip_noise_gamma": -1}, "train.ip_noise_gamma: Input should be greater than or equal to 0"),
        ({"noise_offset_random_strength": "often"}, "train.noise_offset_random_strength"),
        ({"zero_terminal_snr": "maybe"}, "train.zero_terminal_snr"),
    ],
)
def test_invalid_noise_params_name_the_key(keys, message):
    with pytest.raises(ParamsError, match=message) as caught:
        validate_params({"train": keys})
    assert isinstance(caught.value, KilnError)


# --- offset noise -----------------------------------------------------------------------------------


def test_offset_noise_is_a_per_sample_per_channel_constant():
    latents, base = torch.randn(3, 4, 8, 8, generator=gen(1)), torch.randn(3, 4, 8, 8, generator=gen(2))
    g, replay = gen(), gen()
    out = offset_noise(base, latents, NoiseSettings(offset=0.1), g)
    expected = base + 0.1 * torch.randn(3, 4, 1, 1, generator=replay).expand(3, 4, 8, 8)
    torch.testing.assert_close(out, expected)
    shift = out - base
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))  # constant over H and W
    assert same_next_draw(g, replay)
    # Off at 0: no change and nothing drawn.
    g = gen()
    assert torch.equal(offset_noise(base, latents, NoiseSettings(), g), base) and same_next_draw(g, gen())


def test_offset_noise_random_strength_scales_by_one_uniform_per_step():
    latents, base = torch.randn(3, 4, 8, 8, generator=gen(1)), torch.randn(3, 4, 8, 8, generator=gen(2))
    replay = gen()
    out = offset_noise(base, latents, NoiseSettings(offset=0.3, offset_random_strength=True), gen())
    strength = 0.3 * uniform(replay)  # kohya: noise_offset × U[0, 1), one per step
    torch.testing.assert_close(out, base + strength * torch.randn(3, 4, 1, 1, generator=replay))
    # Over many steps the per-step strength is U[0, offset): mean offset / 2, never above offset.
    strengths = []
    for step in range(2000):
        shift = offset_noise(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), NoiseSettings(1.0, True), gen(step))
        draw = gen(step)
        uniform(draw)
        strengths.append(shift.item() / torch.randn(1, 1, 1, 1, generator=draw).item())
    strengths = torch.tensor(strengths)
    assert 0 <= strengths.min() and strengths.max() < 1
    assert strengths.mean().item() == pytest.approx(0.5, abs=4 * math.sqrt(1 / 12 / 2000))


def test_adaptive_noise_scale_adds_the_channel_mean_and_clamps_at_zero():
    latents = torch.randn(2, 3, 8, 8, generator=gen(1)) * 0.1
    latents += torch.tensor([[0.5, -2.0, 0.0], [1.0, 0.2, -0.3]]).view(2, 3, 1, 1)
    base = torch.randn(2, 3, 8, 8, generator=gen(2))
    for scale in (0.05, -0.2):  # a negative scale can push the offset below 0: clamped there
        replay = gen()
        out = offset_noise(base, latents, NoiseSettings(offset=0.1, adaptive_scale=scale), gen())
        means = [[latents[b, c].mean().abs().item() for c in range(3)] for b in range(2)]
        offsets = torch.tensor([[max(0.0, 0.1 + scale * m) for m in row] for row in means]).view(2, 3, 1, 1)
        torch.testing.assert_close(out, base + offsets * torch.randn(2, 3, 1, 1, generator=replay))
    # With -0.2, the channels whose |mean| is over 0.5 (-2.0 and 1.0) are clamped to no offset.
    assert (offsets.flatten() == 0).tolist() == [False, True, False, True, False, False]
    # With random strength the uniform scales the base offset before the adaptive part is added.
    replay = gen()
    out = offset_noise(base, latents, NoiseSettings(0.1, True, 0.05), gen())
    u = uniform(replay)
    offsets = torch.tensor([[0.1 * u + 0.05 * latents[b, c].mean().abs().item() for c in range(3)] for b in range(2)])
    torch.testing.assert_close(out, base + offsets.view(2, 3, 1, 1) * torch.randn(2, 3, 1, 1, generator=replay))


def test_offset_noise_statistics():
    # Per (sample, channel), the spatial mean of the noise has variance 1/(H·W) + offset²; the spatial
    # deviations keep their white variance (H·W − 1)/(H·W).
    latents = torch.zeros(4096, 2, 8, 8)
    noise = training_noise(latents, NoiseSettings(offset=0.5), gen(3))
    means = noise.mean(dim=(2, 3))
    assert means.var().item() == pytest.approx(1 / 64 + 0.25, rel=0.05)
    assert (noise - means[..., None, None]).var().item() == pytest.approx(63 / 64, rel=0.01)
    assert means.mean().item() == pytest.approx(0.0, abs=0.03)


# --- pyramid / multi-resolution noise ---------------------------------------------------------------


def reference_pyramid(noise, iterations, discount, generator):
    """kohya / EveryDream2 pyramid noise with levels 0..iterations-1, written with nn.Upsample."""
    batch, channels, height, width = noise.shape
    upsample = torch.nn.Upsample(size=(height, width), mode="bilinear")
    total = noise.clone()
    for level in range(iterations):
        r = 2 + 2 * uniform(generator)
        h, w = max(1, int(height / r**level)), max(1, int(width / r**level))
        total = total + upsample(torch.randn(batch, channels, h, w, generator=generator)) * discount**level
        if h == 1 or w == 1:
            break
    return total / total.std()


@pytest.mark.parametrize(("shape", "iterations", "discount"), [((2, 4, 32, 48), 3, 0.3), ((2, 4, 64, 40), 10, 0.8)])
def test_pyramid_noise_matches_a_reference_replaying_the_draws(shape, iterations, discount):
    noise = torch.randn(shape, generator=gen(1))
    g, replay = gen(), gen()
    torch.testing.assert_close(pyramid_noise(noise, iterations, discount, g), reference_pyramid(noise, iterations, discount, replay))
    assert same_next_draw(g, replay)  # it stopped at the same level: the 1-pixel one when 10 are asked


def test_pyramid_noise_stops_at_the_one_pixel_level():
    # 8×8 latents: level 0 is full size, level 2 at most 8 / 4 = 2 pixels, level 3 at most 8 / 8 = 1:
    # never more than 4 levels.
    noise = torch.randn(1, 1, 8, 8, generator=gen(1))
    g, replay = gen(), gen()
    pyramid_noise(noise, 10, 0.5, g)
    for level in range(4):
        r = 2 + 2 * uniform(replay)
        h = max(1, int(8 / r**level))
        torch.randn(1, 1, h, h, generator=replay)
        if h == 1:
            break
    assert h == 1 and same_next_draw(g, replay)


def test_pyramid_noise_off_and_through_training_noise():
    noise = torch.randn(2, 4, 16, 16, generator=gen(1))
    g = gen()
    assert torch.equal(pyramid_noise(noise, 0, 0.3, g), noise) and same_next_draw(g, gen())
    latents = torch.zeros(2, 4, 16, 16)
    replay = gen()
    expected = reference_pyramid(torch.randn(2, 4, 16, 16, generator=replay), 10, 0.8, replay)
    torch.testing.assert_close(training_noise(latents, settings(pyramid_noise_discount=0.8), gen()), expected)


def low_frequency_share(noise, radius=2):
    """The share of the spectral power within `radius` cycles of DC along both axes."""
    power = torch.fft.fft2(noise.double()).abs() ** 2
    height, width = noise.shape[-2:]
    fy, fx = torch.fft.fftfreq(height) * height, torch.fft.fftfreq(width) * width
    low = (fy.abs()[:, None] <= radius) & (fx.abs()[None, :] <= radius)
    return (power[..., low].sum() / power.sum()).item(), low.float().mean().item()


def test_pyramid_noise_statistics():
    white = torch.randn(256, 4, 32, 32, generator=gen(1))
    pyramid = pyramid_noise(white, 6, 0.5, gen(2))
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)  # normalised to unit std
    assert pyramid.mean().item() == pytest.approx(0.0, abs=0.05)
    white_share, cells = low_frequency_share(white)
    pyramid_share, _ = low_frequency_share(pyramid)
    assert white_share == pytest.approx(cells, rel=0.05)  # white noise: flat spectrum
    assert pyramid_share > 2 * white_share  # level 0 is white too, so about 3x here
    # Neighbouring pixels are correlated, unlike white noise's.
    lag = (pyramid[..., 1:] * pyramid[..., :-1]).mean().item()
    assert lag > 0.05 and abs((white[..., 1:] * white[..., :-1]).mean().item()) < 0.01


# --- input perturbation (ip_noise_gamma) --------------------------------------------------------------


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(**SD_BETAS)


def forward(scheduler, latents, timesteps, noise):
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ip_noise_perturbs_the_input_and_not_the_target(scheduler, prediction):
    latents = torch.randn(3, 4, 8, 8, generator=gen(1))
    timesteps = torch.tensor([10, 500, 990])
    objective = DiffusionObjective.from_scheduler(scheduler, prediction, noise=settings(ip_noise_gamma=0.1))
    batch = objective.add_noise(latents, timesteps, gen())
    replay = gen()
    noise = torch.randn(3, 4, 8, 8, generator=replay)
    xi = torch.randn(3, 4, 8, 8, generator=replay)
    torch.testing.assert_close(batch.noisy_latents, forward(scheduler, latents, timesteps, noise + 0.1 * xi))
    assert torch.equal(batch.noise, noise)
    if prediction == "epsilon":
        assert torch.equal(batch.target, noise)
    else:
        torch.testing.assert_close(batch.target, scheduler.get_velocity(latents, noise, timesteps))
    # Without it, the same draws give the unperturbed input.
    plain = DiffusionObjective.from_scheduler(scheduler, prediction).add_noise(latents, timesteps, gen())
    torch.testing.assert_close(plain.noisy_latents, forward(scheduler, latents, timesteps, noise))
    assert torch.equal(plain.target, batch.target)


def test_ip_noise_random_strength_and_statistics():
    noise = torch.randn(2, 4, 8, 8, generator=gen(1))
    replay = gen()
    out = input_perturbation(noise, settings(ip_noise_gamma=0.2, ip_noise_gamma_random_strength=True), gen())
    gamma = 0.2 * uniform(replay)
    torch.testing.assert_close(out, noise + gamma * torch.randn(2, 4, 8, 8, generator=replay))
    g = gen()
    assert torch.equal(input_perturbation(noise, NoiseSettings(), g), noise) and same_next_draw(g, gen())
    # The perturbation is γ·N(0, 1), independent of the noise.
    big = torch.randn(512, 4, 16, 16, generator=gen(2))
    delta = input_perturbation(big, NoiseSettings(ip_gamma=0.3), gen(3)) - big
    assert delta.std().item() == pytest.approx(0.3, rel=0.01)
    assert abs((delta * big).mean().item()) < 0.3 * 0.01


def test_every_noise_technique_in_order(scheduler):
    """add_noise(): Gaussian, pyramid levels, offset (random strength, adaptive), then input perturbation."""
    cfg = settings(
        noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.02, multires_noise_iterations=3,
        multires_noise_discount=0.4, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
    )
    latents = torch.randn(2, 4, 16, 24, generator=gen(1)) + 0.5
    timesteps = torch.tensor([100, 800])
    batch = DiffusionObjective.from_scheduler(scheduler, "epsilon", noise=cfg).add_noise(latents, timesteps, gen())
    replay = gen()
    noise = reference_pyramid(torch.randn(2, 4, 16, 24, generator=replay), 3, 0.4, replay)
    offset = 0.1 * uniform(replay) + 0.02 * latents.mean(dim=(2, 3), keepdim=True).abs()
    noise = noise + offset * torch.randn(2, 4, 1, 1, generator=replay)
    gamma = 0.1 * uniform(replay)
    perturbed = noise + gamma * torch.randn(2, 4, 16, 24, generator=replay)
    torch.testing.assert_close(batch.noise, noise)
    torch.testing.assert_close(batch.target, noise)
    torch.testing.assert_close(batch.noisy_latents, forward(scheduler, latents, timesteps, perturbed))


def test_noise_keeps_the_latents_dtype():
    cfg = NoiseSettings(offset=0.1, adaptive_scale=0.01, multires_iterations=4, ip_gamma=0.1)
    latents = torch.randn(2, 4, 16, 16).to(torch.bfloat16)
    noise = training_noise(latents, cfg, gen())
    assert noise.dtype == torch.bfloat16 and input_perturbation(noise, cfg, gen()).dtype == torch.bfloat16


# --- zero terminal SNR -------------------------------------------------------------------------------


def test_zero_terminal_snr_matches_diffusers(scheduler):
    reference = DDPMScheduler(**SD_BETAS, rescale_betas_zero_snr=True).alphas_cumprod
    rescaled = zero_terminal_snr(scheduler.alphas_cumprod)
    torch.testing.assert_close(rescaled.float(), reference, rtol=1e-4, atol=1e-6)
    assert rescaled[-1].item() == 0 and reference[-1].item() == 0
    assert rescaled[0].item() == pytest.approx(scheduler.alphas_cumprod[0].item(), rel=1e-12)
    assert (rescaled[1:] < rescaled[:-1]).all()  # still strictly decreasing
    # Lin et al. Algorithm 1 on √ᾱ: an affine map fixed at the first value, zero at the last.
    root = scheduler.alphas_cumprod.double().sqrt()
    t = torch.tensor([1, 250, 500, 998])
    affine = (root[t] - root[-1]) / (root[0] - root[-1]) * root[0]
    torch.testing.assert_close(rescaled[t].sqrt(), affine)


def test_zero_terminal_snr_in_the_objective(scheduler, caplog):
    latents = torch.randn(2, 4, 8, 8, generator=gen(1))
    with caplog.at_level(logging.WARNING, logger="pipeline.noise"):
        objective = DiffusionObjective.from_scheduler(scheduler, "v_prediction", zero_terminal_snr=True)
    assert not caplog.records
    torch.testing.assert_close(objective.alphas_cumprod, zero_terminal_snr(scheduler.alphas_cumprod))
    # At the last timestep the input is pure noise and v = −x0.
    batch = objective.add_noise(latents, torch.tensor([999, 999]), gen())
    torch.testing.assert_close(batch.noisy_latents, batch.noise)
    torch.testing.assert_close(batch.target, -latents)
    default = DiffusionObjective.from_scheduler(scheduler, "v_prediction")
    assert torch.equal(default.alphas_cumprod, scheduler.alphas_cumprod.double())

    with caplog.at_level(logging.WARNING, logger="pipeline.noise"):
        DiffusionObjective.from_scheduler(scheduler, "epsilon", zero_terminal_snr=True)
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    message = caplog.records[0].getMessage()
    assert "train.zero_terminal_snr" in message and "epsilon" in message and "v-prediction" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.noise"):
        DiffusionObjective.from_scheduler(scheduler, "epsilon")
    assert not caplog.records
