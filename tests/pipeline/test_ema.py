"""The EMA of the trained weights (pipeline.ema) against a manual float64 recurrence (EveryDream2 semantics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.ema import EMA, decay_for_target
from pipeline.errors import KilnError, ParamsError
from pipeline.params import validate_params

SHAPES = [(3, 4), (5,), (2, 2, 2)]


def _parameters(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]


def _train_step(parameters: list[torch.nn.Parameter], generator: torch.Generator) -> None:
    """What an optimizer step does to the weights, as far as the EMA can tell."""
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.1)


# --- the update ------------------------------------------------------------------------------------------


def test_update_every_interval_matches_the_manual_recurrence():
    decay, interval = 0.8, 3
    parameters = _parameters()
    ema = EMA(parameters, decay, interval)
    reference = [p.detach().double().numpy().copy() for p in parameters]
    generator = torch.Generator().manual_seed(1)
    updated = []
    for step in range(1, 11):  # the trainer calls step() after each optimizer step, counting from 1
        _train_step(parameters, generator)
        if step % interval == 0:
            for index, p in enumerate(parameters):
                reference[index] = decay * reference[index] + (1 - decay) * p.detach().double().numpy()
        if ema.step(step):
            updated.append(step)
        for shadow, expected in zip(ema.shadow, reference, strict=True):
            torch.testing.assert_close(shadow.double(), torch.from_numpy(expected), rtol=1e-6, atol=1e-7)
    assert updated == [3, 6, 9]
    assert all(shadow.dtype == torch.float32 for shadow in ema.shadow)
    # The EMA lags the weights: it is neither the start nor the end.
    assert not torch.allclose(ema.shadow[0], parameters[0].detach())


def test_shadows_start_as_copies_of_the_weights():
    parameters = _parameters()
    ema = EMA(parameters, 0.5, 1)
    for shadow, p in zip(ema.shadow, parameters, strict=True):
        assert torch.equal(shadow, p.detach()) and shadow.data_ptr() != p.data_ptr()
    with torch.no_grad():
        parameters[0].add_(1.0)
    assert not torch.equal(ema.shadow[0], parameters[0].detach())  # a copy, not a view


def test_a_bf16_parameter_still_moves_its_float32_shadow_at_decay_0_9999():
    decay = 0.9999
    parameter = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ema = EMA([parameter], decay, 1)
    with torch.no_grad():
        parameter.fill_(2.0)
    # The reason for float32: a bf16 shadow would be rounded straight back to 1.
    bf16 = torch.ones(4, dtype=torch.bfloat16) * decay + torch.full((4,), 2.0, dtype=torch.bfloat16) * (1 - decay)
    assert (bf16 == 1).all()
    expected = 1.0
    for step in range(1, 6):
        ema.step(step)
        expected = decay * expected + (1 - decay) * 2.0
    assert ema.shadow[0].dtype == torch.float32
    torch.testing.assert_close(ema.shadow[0].double(), torch.full((4,), expected, dtype=torch.float64), rtol=0, atol=1e-6)
    assert (ema.shadow[0] > 1.0004).all()


# --- the rate --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "total", "interval"), [(0.5, 1000, 10), (0.1, 20, 2), (0.9, 7, 1), (0.3, 4500, 500)])
def test_decay_for_target_compounds_to_the_target(target, total, interval):
    decay = decay_for_target(target, total, interval)
    assert 0 < decay < 1
    assert decay ** (total / interval) == pytest.approx(target, rel=1e-12)
    # The same thing, as the EMA applies it: a weight's share after all the updates is the target.
    share = 1.0
    for _ in range(total // interval):
        share *= decay
    if total % interval == 0:
        assert share == pytest.approx(target, rel=1e-9)


def test_decay_for_target_with_fewer_steps_than_one_interval_is_the_target():
    assert decay_for_target(0.5, 3, 10) == 0.5  # at least one update


def test_decay_for_target_from_params_like_the_trainer():
    cfg = validate_params({"train": {"ema_strength_target": 0.5, "ema_update_interval": 2}}).train
    assert cfg.ema_enabled and cfg.ema_decay_rate is None
    decay = decay_for_target(cfg.ema_strength_target, 20, cfg.ema_update_interval)
    assert decay == pytest.approx(math.exp(math.log(0.5) / 10), rel=1e-12)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5, math.nan])
def test_decay_outside_0_1_is_an_error_naming_the_key(decay):
    with pytest.raises(KilnError, match=r"train\.ema_decay_rate: must be in \(0, 1\)"):
        EMA(_parameters(), decay, 1)


# --- swapping the weights in --------------------------------------------------------------------------------


def _diverged() -> tuple[list[torch.nn.Parameter], EMA, list[torch.Tensor]]:
    parameters = _parameters()
    ema = EMA(parameters, 0.5, 1)
    generator = torch.Generator().manual_seed(2)
    for step in range(1, 4):
        _train_step(parameters, generator)
        ema.step(step)
    trained = [p.detach().clone() for p in parameters]
    assert not torch.equal(trained[0], ema.shadow[0])
    return parameters, ema, trained


def test_swapped_puts_the_ema_weights_in_and_restores_the_trained_ones():
    parameters, ema, trained = _diverged()
    pointers = [p.data_ptr() for p in parameters]
    with ema.swapped():
        for p, shadow in zip(parameters, ema.shadow, strict=True):
            assert torch.equal(p.detach(), shadow)
    for p, original, pointer in zip(parameters, trained, pointers, strict=True):
        assert torch.equal(p.detach(), original)
        assert p.data_ptr() == pointer and p.requires_grad  # the same tensors: the optimizer still holds them


def test_swapped_restores_after_an_exception_inside():
    parameters, ema, trained = _diverged()
    with pytest.raises(RuntimeError, match="sampling failed"), ema.swapped():
        assert torch.equal(parameters[1].detach(), ema.shadow[1])
        raise RuntimeError("sampling failed")
    for p, original in zip(parameters, trained, strict=True):
        assert torch.equal(p.detach(), original)


def test_swapped_restores_all_when_copying_the_ema_weights_in_fails_part_way():
    parameters, ema, trained = _diverged()
    ema.shadow[2] = torch.zeros(7)  # the last copy fails, after the first two went in
    with pytest.raises(RuntimeError), ema.swapped():
        pytest.fail("the body must not run")
    for p, original in zip(parameters, trained, strict=True):
        assert torch.equal(p.detach(), original)


def test_swapped_casts_to_the_parameters_dtype():
    parameters = _parameters(dtype=torch.bfloat16)
    ema = EMA(parameters, 0.5, 1)
    trained = [p.detach().clone() for p in parameters]
    with torch.no_grad():
        for shadow in ema.shadow:
            shadow.add_(0.25)
    with ema.swapped():
        for p, shadow in zip(parameters, ema.shadow, strict=True):
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), shadow.to(torch.bfloat16))
    assert all(torch.equal(p.detach(), t) for p, t in zip(parameters, trained, strict=True))


# --- save / load -----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    _, ema, _ = _diverged()
    path = ema.save(tmp_path / "kiln_ema.safetensors")
    assert path == tmp_path / "kiln_ema.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kiln_ema.safetensors"]  # no temporary file left
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"decay": "0.5", "interval": "1"}
        assert sorted(f.keys()) == ["00000", "00001", "00002"]

    fresh = EMA(_parameters(seed=5), 0.5, 1)
    fresh.load(path)
    for loaded, saved in zip(fresh.shadow, ema.shadow, strict=True):
        assert torch.equal(loaded, saved)
    assert ema.state_dict().keys() == {"00000", "00001", "00002"}


def test_load_of_a_missing_file_names_ema_resume_model(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(KilnError, match=r"train\.ema_resume_model: .*nowhere\.safetensors does not exist"):
        EMA(_parameters(), 0.5, 1).load(missing)


def _expect_refused(ema: EMA, path, message: str) -> None:
    before = [shadow.clone() for shadow in ema.shadow]
    with pytest.raises(KilnError, match=message) as info:
        ema.load(path)
    assert str(path) in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, before, strict=True))  # left as they were


def test_load_of_another_networks_file_is_an_error_naming_it(tmp_path):
    ema = EMA(_parameters(), 0.5, 1)
    fewer = tmp_path / "fewer.safetensors"
    save_file({"00000": torch.zeros(3, 4), "00001": torch.zeros(5)}, str(fewer))
    _expect_refused(ema, fewer, r"holds 2 EMA tensors, but this run trains 3")

    shape = tmp_path / "shape.safetensors"
    save_file({"00000": torch.zeros(3, 4), "00001": torch.zeros(5), "00002": torch.zeros(2, 4)}, str(shape))
    _expect_refused(ema, shape, r"EMA tensor 2 has shape \(2, 4\), the trained one \(2, 2, 2\)")

    names = tmp_path / "lora.safetensors"
    save_file({"a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(5), "c.weight": torch.zeros(2, 2, 2)}, str(names))
    _expect_refused(ema, names, r"tensors are not named as Kiln's EMA file names them")


def test_load_of_a_file_that_is_not_safetensors_names_it(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    _expect_refused(EMA(_parameters(), 0.5, 1), junk, r"not a readable safetensors file of EMA weights")


# --- params ----------------------------------------------------------------------------------------------


def test_ema_param_defaults():
    cfg = validate_params({"train": {}}).train
    assert (cfg.ema_decay_rate, cfg.ema_strength_target, cfg.ema_update_interval) == (None, None, 500)
    assert (cfg.ema_device, cfg.ema_resume_model, cfg.ema_sample_ema_model, cfg.ema_sample_nonema_model) == ("cpu", None, None, None)
    assert not cfg.ema_enabled
    assert validate_params({"train": {"ema_decay_rate": 0.999}}).train.ema_enabled


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"ema_decay_rate": 0.99, "ema_strength_target": 0.5}, r"train\.ema_strength_target: set it or ema_decay_rate, not both"),
        ({"ema_decay_rate": 1.0}, r"train\.ema_decay_rate: Input should be less than 1"),
        ({"ema_strength_target": 0}, r"train\.ema_strength_target: Input should be greater than 0"),
        ({"ema_update_interval": 0}, r"train\.ema_update_interval: Input should be greater than or equal to 1"),
        ({"ema_device": "tpu"}, r"train\.ema_device: Input should be 'cpu' or 'cuda'"),
    ],
)
def test_bad_ema_params_name_their_key(train, message):
    with pytest.raises(ParamsError, match=message):
        validate_params({"train": train})


def test_update_interval_of_one_updates_every_step():
    parameters = _parameters()
    ema = EMA(parameters, 0.9, 1)
    reference = parameters[1].detach().double().numpy().copy()
    generator = torch.Generator().manual_seed(4)
    for step in range(1, 6):
        _train_step(parameters, generator)
        assert ema.step(step)
        reference = 0.9 * reference + 0.1 * parameters[1].detach().double().numpy()
    np.testing.assert_allclose(ema.shadow[1].double().numpy(), reference, rtol=1e-6)
