"""Optimizers and learning-rate schedules, under the names kohya and EveryDream2 users know."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from pipeline.errors import KilnError, ParamsError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit", "lion", "prodigy", "adafactor", "sgd", "adacoor")


class AdaCoor(torch.optim.Optimizer):
    """EveryDream2's learning-rate-free optimizer.

    Per parameter a bfloat16 state v starts at zero. Each step: v <- v + eps * g^2, then
    p <- p - (eps * g) / (sqrt(v) + eps). There is no learning rate.
    """

    def __init__(self, params: Iterable[Any], eps: float = 1e-8):
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(params, {"eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eps = group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                if "v" not in state:
                    state["v"] = torch.zeros_like(param, dtype=torch.bfloat16)
                state["v"] = (state["v"].float() + eps * grad * grad).to(torch.bfloat16)
                param.add_(-(eps * grad) / (state["v"].float().sqrt() + eps))
        return loss


def scaled_lr(lr: float, batch_size: int, grad_accum: int) -> float:
    """EveryDream2's scale_lr: lr x (batch_size x grad_accum) ** 0.55."""
    return lr * (batch_size * grad_accum) ** 0.55


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of one of OPTIMIZERS; a KilnError when its package is not installed."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "sgd":
        return torch.optim.SGD
    if name == "adacoor":
        return AdaCoor
    if name == "adafactor":
        return _import("transformers.optimization", "Adafactor", "transformers")
    if name == "adamw8bit":
        return _import("bitsandbytes.optim", "AdamW8bit", "bitsandbytes")
    if name == "lion":
        return _import("lion_pytorch", "Lion", "lion-pytorch")
    if name == "prodigy":
        return _import("prodigyopt", "Prodigy", "prodigyopt")
    raise KilnError(f"train.optimizer: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def check_optimizer_args(optimizer: type, args: Mapping[str, Any]) -> None:
    """Every key of train.optimizer_args must be a keyword of the optimizer's constructor; Kiln passes
    the parameters and the learning rate itself."""
    parameters = inspect.signature(optimizer).parameters
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
        return  # it takes any keyword: only its constructor can tell
    keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    takes = [name for name, parameter in parameters.items() if parameter.kind in keywords and name not in ("params", "lr")]
    for key in args:
        if key == "lr" and "lr" in parameters:
            raise ParamsError("train.optimizer_args.lr: the learning rate is train.learning_rate; set it there")
        if key not in takes:
            raise ParamsError(f"train.optimizer_args.{key}: not an argument of {optimizer.__name__}; it takes: {', '.join(takes)}")


def build_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float, args: dict[str, Any]) -> torch.optim.Optimizer:
    """One of OPTIMIZERS; `args` are passed through as keyword arguments (train.optimizer_args)."""
    if name == "adamw8bit" and not torch.cuda.is_available():
        raise KilnError("train.optimizer: adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on this machine")
    optimizer = optimizer_class(name)
    check_optimizer_args(optimizer, args)
    settings: dict[str, Any] = {} if optimizer is AdaCoor else {"lr": lr}  # AdaCoor has no learning rate
    if name == "adamw" and any(p.is_cuda for group in param_groups for p in group["params"]):
        settings["fused"] = True
    if name == "adafactor":
        settings.update(scale_parameter=False, relative_step=False, warmup_init=False)
    try:
        return optimizer(param_groups, **{**settings, **args})
    except (TypeError, ValueError) as exc:
        if not args:
            raise
        # A value the constructor refuses (eps: -1, betas: 0.9): name the key the user wrote.
        raise ParamsError(f"train.optimizer_args: {optimizer.__name__} refused {args}: {exc}") from None


def _import(module: str, attribute: str, package: str) -> Any:
    import importlib

    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError:
        raise KilnError(f"train.optimizer needs the `{package}` package: pip install {package}") from None


def decay_steps(scheduler: str, total_steps: int, lr_decay_steps: int | None) -> int:
    """The schedule's length. For cosine, EveryDream2 stretches it past the end of training (x 1.2) so the
    learning rate never reaches zero; an explicit lr_decay_steps wins."""
    if lr_decay_steps:
        return lr_decay_steps
    if scheduler == "cosine":
        return math.ceil(total_steps * 1.2)
    return total_steps


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, lr_decay_steps: int | None,
    num_cycles: int = 1, power: float = 1.0,
) -> Any:
    """diffusers' schedules: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial."""
    from diffusers.optimization import get_scheduler

    if name not in SCHEDULERS:
        raise KilnError(f"train.lr_scheduler: unknown schedule {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps,
        num_training_steps=decay_steps(name, total_steps, lr_decay_steps), num_cycles=num_cycles, power=power,
    )
