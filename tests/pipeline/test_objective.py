import pytest
import torch
from diffusers import DDPMScheduler

from pipeline.objective import DiffusionObjective


@pytest.fixture
def scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_noisy_latents_and_targets_match_diffusers(scheduler):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([0, 500, 999])
    for prediction in ("epsilon", "v_prediction"):
        objective = DiffusionObjective.from_scheduler(scheduler, prediction)
        batch = objective.add_noise(latents, timesteps, torch.Generator().manual_seed(1))
        torch.testing.assert_close(batch.noisy_latents, scheduler.add_noise(latents, batch.noise, timesteps))
        expected = batch.noise if prediction == "epsilon" else scheduler.get_velocity(latents, batch.noise, timesteps)
        torch.testing.assert_close(batch.target, expected)


def test_timesteps_stay_in_per_sample_ranges(scheduler):
    objective = DiffusionObjective.from_scheduler(scheduler)
    low = torch.tensor([0, 200, 900, 500] * 500)
    high = torch.tensor([1000, 400, 1000, 500] * 500)
    timesteps = objective.sample_timesteps(low, high, torch.Generator().manual_seed(0))
    assert ((timesteps >= low) & ((timesteps < high) | (low == high))).all()
    assert (timesteps[3::4] == 500).all()  # min == max: exactly that timestep
    assert timesteps[0::4].float().mean().item() == pytest.approx(499.5, abs=20)  # uniform over [0, 1000)


def test_loss_weights_and_masks(scheduler):
    objective = DiffusionObjective.from_scheduler(scheduler)
    latents = torch.zeros(2, 1, 2, 2)
    batch = objective.add_noise(latents, torch.tensor([10, 10]), torch.Generator().manual_seed(0))
    pred = batch.target + torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # errors 1 and 4 everywhere
    result = objective.compute_loss(pred, batch, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(result.per_sample, torch.tensor([1.0, 2.0]))
    assert result.loss.item() == pytest.approx(1.5)
    # A mask is normalised to mean 1: a uniform error keeps its scale; only the masked cells count.
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    masked = objective.compute_loss(pred, batch, torch.ones(2), masks=mask).per_sample
    torch.testing.assert_close(masked, torch.tensor([1.0, 4.0]))
    outside = pred.clone()
    outside[0, 0, 1, 1] += 10  # error where the mask is 0 is ignored
    torch.testing.assert_close(objective.compute_loss(outside, batch, torch.ones(2), masks=mask).per_sample, masked)
    inside = pred.clone()
    inside[0, 0, 0, 0] += 10  # where it is 1, it counts fully: (1 + 10)^2 x 4 / 4
    assert objective.compute_loss(inside, batch, torch.ones(2), masks=mask).per_sample[0].item() == pytest.approx(121.0)


def test_prepare_draws_each_sample_from_its_own_range(scheduler):
    # The objective owns the ranges: train images in [100, 300), reg images in [800, 1000).
    objective = DiffusionObjective.from_scheduler(scheduler, train_range=(100, 300), reg_range=(800, 1000))
    is_reg = torch.tensor([False, True] * 500)
    latents = torch.zeros(1000, 1, 2, 2)
    batch = objective.prepare(latents, is_reg, torch.Generator().manual_seed(4))
    replay = torch.Generator().manual_seed(4)
    low, high = torch.where(is_reg, 800, 100), torch.where(is_reg, 1000, 300)
    expected = objective.sample_timesteps(low, high, replay)
    assert torch.equal(batch.timesteps, expected)
    assert ((batch.timesteps[~is_reg] >= 100) & (batch.timesteps[~is_reg] < 300)).all()
    assert ((batch.timesteps[is_reg] >= 800) & (batch.timesteps[is_reg] < 1000)).all()
    # Then the noise, from the same generator: prepare == sample_timesteps + add_noise.
    torch.testing.assert_close(batch.noisy_latents, objective.add_noise(latents, expected, replay).noisy_latents)
    # Given noise (reflow's cached x0) replaces the draw; the timesteps are drawn first either way.
    noise = torch.ones_like(latents)
    given = objective.prepare(latents, is_reg, torch.Generator().manual_seed(4), noise=noise)
    assert torch.equal(given.timesteps, expected) and torch.equal(given.noise, noise)


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type must be epsilon or v_prediction"):
        DiffusionObjective(torch.ones(10), "sample")
