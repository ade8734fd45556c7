"""Training timesteps: per-sample ranges (regularisation images may have their own), drawn uniformly
or from the log-normal schedule.

A range is [low, high): kohya's `min_timestep` / `max_timestep`, EveryDream2's `timestep_start` /
`timestep_end`. low == high means exactly that timestep.
"""

from __future__ import annotations

import torch

# Resampling rounds before the rest are drawn from the truncated distribution directly.
LOG_NORM_TRIES = 4
LOG_NORM_SCALE = 250.0
LOG_NORM_MU = 0.65


def ranges(is_reg: torch.Tensor, train: tuple[int, int], reg: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (low, high): the reg range for regularisation images, the train range for the rest."""
    low = torch.where(is_reg, torch.tensor(reg[0]), torch.tensor(train[0])).long()
    high = torch.where(is_reg, torch.tensor(reg[1]), torch.tensor(train[1])).long()
    return low, high


def uniform(low: torch.Tensor, high: torch.Tensor, generator: torch.Generator, num_train_timesteps: int) -> torch.Tensor:
    """Uniform integers in [low, high) per sample; where low == high, exactly that value."""
    draw = torch.rand(low.shape, generator=generator, dtype=torch.float64)
    span = (high - low).clamp_min(0).double()
    timesteps = low.double() + torch.floor(draw * span)
    return timesteps.long().clamp(0, num_train_timesteps - 1)


def log_norm_mu(global_step: int, max_train_steps: int | None) -> float:
    """μ = 0.65 × progress when the run's length is known, else 0.65."""
    if not max_train_steps:
        return LOG_NORM_MU
    return LOG_NORM_MU * global_step / max_train_steps


def log_normal(
    low: torch.Tensor, high: torch.Tensor, mu: float, generator: torch.Generator, num_train_timesteps: int,
) -> torch.Tensor:
    """round(250 · s), s ~ LogNormal(μ, 1), inside each sample's [low, high).

    Out-of-range draws are redrawn LOG_NORM_TRIES times; any still outside are drawn from the log-normal
    truncated to the range by inverse CDF, so the loop is bounded whatever the range.
    """
    size = low.shape
    top = torch.maximum(high - 1, low)  # the largest allowed value; low itself when low == high
    timesteps = torch.full(size, -1, dtype=torch.long)
    pending = torch.ones(size, dtype=torch.bool)
    for _ in range(LOG_NORM_TRIES):
        s = torch.exp(mu + torch.randn(size, generator=generator, dtype=torch.float64))
        draw = torch.round(LOG_NORM_SCALE * s).long()
        accept = pending & (draw >= low) & (draw <= top)
        timesteps[accept] = draw[accept]
        pending &= ~accept
        if not pending.any():
            break
    if pending.any():
        # round(250 s) ∈ [low, top] ⟺ 250 s ∈ [low − ½, top + ½): invert the normal CDF of ln s there.
        lower = (low[pending].double() - 0.5).clamp_min(0) / LOG_NORM_SCALE
        upper = (top[pending].double() + 0.5) / LOG_NORM_SCALE
        cdf_low = torch.special.ndtr(torch.log(lower) - mu)  # log(0) = -inf gives 0
        cdf_high = torch.special.ndtr(torch.log(upper) - mu)
        # One uniform per sample, used where pending: a sample's value depends only on its own draws, so
        # the train samples come out the same whatever range the reg samples have.
        u = torch.rand(size, generator=generator, dtype=torch.float64)[pending]
        quantile = (cdf_low + u * (cdf_high - cdf_low)).clamp(1e-300, 1 - 1e-16)
        draw = torch.round(LOG_NORM_SCALE * torch.exp(mu + torch.special.ndtri(quantile)))
        # Where the tail's mass underflows, the quantile clamps: keep the value inside the range anyway.
        timesteps[pending] = torch.minimum(torch.maximum(draw.long(), low[pending]), top[pending])
    return timesteps.clamp(0, num_train_timesteps - 1)
