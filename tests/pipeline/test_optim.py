import math

import pytest
import torch

from pipeline.errors import KilnError, ParamsError
from pipeline.optim import AdaCoor, build_optimizer, build_scheduler, decay_steps, scaled_lr


def test_adacoor_follows_its_maths_on_a_toy_problem():
    eps = 1e-2
    param = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    optimizer = AdaCoor([param], eps=eps)
    expected, v = param.detach().clone(), torch.zeros(2)
    for _ in range(50):
        optimizer.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        grad = 2 * expected
        v = (v + eps * grad * grad).to(torch.bfloat16).float()  # the state is kept in bfloat16
        expected = expected - (eps * grad) / (v.sqrt() + eps)
        optimizer.step()
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)
    assert (param.detach().abs() < torch.tensor([3.0, 2.0])).all()  # it descends
    assert optimizer.state[param]["v"].dtype == torch.bfloat16


def test_scale_lr():
    assert scaled_lr(1e-6, 4, 2) == pytest.approx(1e-6 * 8**0.55)


def lrs(name, warmup=2, total=10, decay=None, **kw):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(name, optimizer, warmup, total, decay, **kw)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_scheduler_curves():
    assert lrs("constant") == [1.0] * 10
    assert lrs("constant_with_warmup")[:3] == [0.0, 0.5, 1.0]
    linear = lrs("linear")
    assert linear[:3] == [0.0, 0.5, 1.0] and linear[9] == pytest.approx(1 / 8)
    cosine = lrs("cosine", warmup=0)
    # EveryDream2: cosine decays over 1.2 x the steps, so the last step's lr is still above zero.
    assert decay_steps("cosine", 10, None) == 12
    assert cosine[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 12)))
    assert lrs("cosine", warmup=0, decay=10)[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))
    restarts = lrs("cosine_with_restarts", warmup=0, num_cycles=2)
    assert restarts[5] == pytest.approx(1.0)  # the second cycle starts again at the peak
    polynomial = lrs("polynomial", warmup=0, power=2.0)
    assert polynomial[5] == pytest.approx((1 - 5 / 10) ** 2 * (1 - 1e-7) + 1e-7)


def test_optimizer_errors_and_args():
    param = torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [param]}]
    assert build_optimizer("adamw", groups, 1e-3, {"weight_decay": 0.1}).param_groups[0]["weight_decay"] == 0.1
    assert isinstance(build_optimizer("adacoor", groups, 0.0, {}), AdaCoor)
    if not torch.cuda.is_available():
        with pytest.raises(KilnError, match="adamw8bit needs a CUDA GPU .* use adamw"):
            build_optimizer("adamw8bit", groups, 1e-3, {})
    with pytest.raises(KilnError, match="unknown optimizer 'adam'"):
        build_optimizer("adam", groups, 1e-3, {})
    with pytest.raises(KilnError, match="unknown schedule 'cosine_annealing'"):
        build_scheduler("cosine_annealing", torch.optim.SGD([param], lr=1.0), 0, 10, None)


def test_optimizer_args_it_does_not_take_or_refuses_are_one_line_errors():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    with pytest.raises(ParamsError) as caught:
        build_optimizer("adamw", groups, 1e-3, {"foo": 1})
    assert str(caught.value).startswith(
        "train.optimizer_args.foo: not an argument of AdamW; it takes: betas, eps, weight_decay, amsgrad"
    )
    with pytest.raises(ParamsError) as caught:
        build_optimizer("adacoor", groups, 0.0, {"lr": 1.0})
    assert str(caught.value) == "train.optimizer_args.lr: not an argument of AdaCoor; it takes: eps"
    with pytest.raises(ParamsError) as caught:
        build_optimizer("sgd", groups, 1e-3, {"lr": 1.0})
    assert str(caught.value) == "train.optimizer_args.lr: the learning rate is train.learning_rate; set it there"
    args = {"weight_decay": 0.1, "betas": [0.9, 0.99]}
    assert build_optimizer("adamw", groups, 1e-3, args).param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ParamsError) as caught:
        build_optimizer("adamw", groups, 1e-3, {"eps": -1.0})
    assert str(caught.value) == "train.optimizer_args: AdamW refused {'eps': -1.0}: Invalid epsilon value: -1.0"
