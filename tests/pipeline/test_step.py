"""The step unit with a stub UNet: one UNet call per step with each family's conditioning, and validation
and reflow going through the same predict."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.flow import RectifiedFlowObjective, velocity_field
from pipeline.objective import DiffusionObjective
from pipeline.params import TrainParams
from pipeline.sd import encode_text, load_components
from pipeline.step import TrainingStep
from pipeline.validation import Validator


class StubUNet(nn.Module):
    """Records every call; predicts `weight * noisy_latents`, so a backward pass reaches `weight`."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))
        self.calls: list[dict] = []

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        self.calls.append(
            {"noisy_latents": noisy_latents, "timesteps": timesteps, "states": encoder_hidden_states, "added": added_cond_kwargs}
        )
        return SimpleNamespace(sample=self.weight * noisy_latents)


@pytest.fixture(scope="module", params=["tiny-sd15", "tiny-sdxl"])
def components(request):
    return load_components(request.param)


def batch_of(size: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "latents": torch.randn(size, 4, 8, 8, generator=generator),
        "masks": None,
        "captions": ["a sks circle", ""][:size],
        "is_reg": torch.tensor([False, True][:size]),
        "loss_weight": torch.ones(size),
        "time_ids": torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0], [768.0, 512.0, 8.0, 0.0, 768.0, 512.0]][:size]),
        "image_ids": ["a", "b"][:size],
    }


def make_step(components, objective=None, **cfg):
    unet = StubUNet()
    objective = objective or DiffusionObjective.from_scheduler(components.noise_scheduler)
    backward = lambda loss: loss.backward()  # noqa: E731
    return TrainingStep(unet, components, objective, TrainParams(**cfg), "cpu", backward), unet


def test_one_unet_call_per_step_with_the_family_conditioning(components):
    step, unet = make_step(components)
    batch = batch_of()
    output = step.train_step(batch, 0, torch.Generator().manual_seed(1))
    assert len(unet.calls) == 1
    call = unet.calls[0]
    expected_states, pooled = encode_text(components, batch["captions"], "cpu")
    torch.testing.assert_close(call["states"], expected_states)
    if components.family == "sdxl":
        # SDXL: the pooled embedding of the second encoder and the size/crop time ids.
        torch.testing.assert_close(call["added"]["text_embeds"], pooled)
        torch.testing.assert_close(call["added"]["time_ids"], batch["time_ids"])
    else:
        assert call["added"] is None
    # The latents reach the UNet scaled by the VAE's factor, noised at the step's timesteps.
    assert torch.equal(call["timesteps"], output.timesteps)
    assert unet.weight.grad is not None and output.loss.ndim == 0 and output.per_sample.shape == (2,)


def test_the_step_draws_in_a_fixed_order_from_its_generator(components):
    # encode (embedding perturbation) -> timesteps -> noise, all from the batch's generator.
    step, unet = make_step(components, embedding_perturbation=0.1)
    batch = batch_of()
    step.train_step(batch, 0, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    states, _ = encode_text(components, batch["captions"], "cpu", 1, 0.1, replay)
    latents = batch["latents"] * components.scaling_factor
    noisy = step.objective.prepare(latents, batch["is_reg"], replay, 0)
    torch.testing.assert_close(unet.calls[0]["states"], states)
    torch.testing.assert_close(unet.calls[0]["noisy_latents"], noisy.noisy_latents)


def test_validation_and_reflow_go_through_the_same_predict(components, monkeypatch):
    step, unet = make_step(components)
    predicted = []
    real_predict = step.predict

    def counting_predict(*args, **kwargs):
        predicted.append(1)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(step, "predict", counting_predict)

    class Store:
        def read(self, row):
            return {"mean": torch.full((4, 8, 8), float(row["number"]))}

    rows = [{"image_id": f"i{n}", "cache_key": f"k{n}", "bucket": "64x64", "caption": "x"} for n in range(3)]
    index = {f"k{n}": {"number": n, "original_size": [64, 64], "crop_top_left": [0, 0], "target_size": [64, 64]} for n in range(3)}
    validator = Validator(rows, Store(), index, 0, 1000, 2, seed=0)
    assert validator.loss(step) > 0
    assert len(predicted) == len(unet.calls) == 2  # two validation batches (2 + 1 images)
    assert unet.training  # back in training mode after validation

    velocity = velocity_field(step, batch_of())
    velocity(torch.zeros(2, 4, 8, 8), torch.tensor([0.0, 500.0]))
    assert len(predicted) == len(unet.calls) == 3


def test_the_step_never_asks_which_objective_is_active(components):
    # The same step, with the rectified-flow objective: its path and target, through the same calls.
    flow = RectifiedFlowObjective(1000)
    step, unet = make_step(components, flow)
    batch = batch_of()
    output = step.train_step(batch, 0, torch.Generator().manual_seed(2))
    replay = torch.Generator().manual_seed(2)
    expected = flow.prepare(batch["latents"] * components.scaling_factor, batch["is_reg"], replay)
    torch.testing.assert_close(unet.calls[0]["noisy_latents"], expected.noisy_latents)
    assert output.timesteps.dtype == torch.float32  # t * 1000, not integer DDPM steps
    pred = 0.5 * expected.noisy_latents
    torch.testing.assert_close(output.loss, ((pred - expected.target) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_masks_apply_only_with_masked_loss(components):
    batch = batch_of()
    batch["masks"] = torch.zeros(2, 1, 8, 8)
    batch["masks"][:, :, :4] = 1
    plain, _ = make_step(components)
    masked, _ = make_step(components, masked_loss=True)
    a = plain.train_step(batch, 0, torch.Generator().manual_seed(4)).per_sample
    b = masked.train_step(batch, 0, torch.Generator().manual_seed(4)).per_sample
    assert not torch.allclose(a, b)
