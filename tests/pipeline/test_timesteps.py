"""Training timesteps: per-sample [min, max) ranges (regularisation images with their own), uniform or
log-normal, checked against exact probabilities with large seeded samples."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from pipeline import timesteps
from pipeline.errors import KilnError, ParamsError
from pipeline.objective import DiffusionObjective
from pipeline.params import validate_params

T = 1000


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def train(**keys):
    return validate_params({"train": keys}).train


def per_sample(cfg, is_reg):
    return timesteps.ranges(is_reg, (cfg.min_timestep, cfg.max_timestep), cfg.reg_timestep_range)


def same_next_draw(a, b):
    return torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


@pytest.fixture(scope="module")
def objectives():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=T)
    return {
        "uniform": DiffusionObjective.from_scheduler(scheduler, "epsilon"),
        "log_normal": DiffusionObjective.from_scheduler(scheduler, "epsilon", log_norm_timesteps=True),
    }


def chi_square_bound(df, z=3.719):
    """The chi-square quantile at 1 − 1e-4 (z is the normal's), by Wilson–Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(draws, values, probs, bins):
    """Pearson's statistic of integer draws against exact probabilities, over `bins` groups of
    consecutive values of about equal mass; returns (statistic, degrees of freedom)."""
    cumulative = probs.cumsum(0) - probs / 2
    group = (cumulative * bins).long().clamp(max=bins - 1)
    expected = torch.zeros(bins, dtype=torch.float64).index_add_(0, group, probs) * len(draws)
    counts = torch.bincount(draws - values[0], minlength=len(values)).double()
    assert len(counts) == len(values)  # nothing outside the range
    observed = torch.zeros(bins, dtype=torch.float64).index_add_(0, group, counts)
    used = expected > 0
    assert expected[used].min() >= 5
    return (((observed - expected) ** 2 / expected)[used].sum().item(), int(used.sum()) - 1)


def uniform_probs(low, high):
    values = torch.arange(low, high)
    return values, torch.full((high - low,), 1 / (high - low), dtype=torch.float64)


def log_normal_probs(low, high, mu):
    """P(t) = Φ(ln((t + ½)/250) − μ) − Φ(ln((t − ½)/250) − μ) over t in [low, high), normalised
    (Φ(ln 0) = 0 for t = 0)."""
    values = torch.arange(low, max(high, low + 1))
    t = values.double()
    upper = torch.special.ndtr(torch.log((t + 0.5) / 250) - mu)
    lower = torch.special.ndtr(torch.log((t - 0.5).clamp_min(0) / 250) - mu)
    probs = upper - lower
    return values, probs / probs.sum()


# --- params --------------------------------------------------------------------------------------------


def test_defaults_and_aliases():
    cfg = train()
    assert (cfg.min_timestep, cfg.max_timestep, cfg.reg_min_timestep, cfg.reg_max_timestep) == (0, 1000, None, None)
    assert cfg.reg_timestep_range == (0, 1000) and not cfg.use_log_norm_timesteps
    aliased = train(timestep_start=100, timestep_end=200)
    assert (aliased.min_timestep, aliased.max_timestep, aliased.reg_timestep_range) == (100, 200, (100, 200))
    # An unset reg key takes the train range's value.
    assert train(min_timestep=100, max_timestep=900, reg_min_timestep=500).reg_timestep_range == (500, 900)
    assert train(min_timestep=100, max_timestep=900, reg_max_timestep=300).reg_timestep_range == (100, 300)
    assert train(min_timestep=100, max_timestep=900, reg_min_timestep=0, reg_max_timestep=1000).reg_timestep_range == (0, 1000)
    # Equal bounds are valid: exactly that timestep.
    fixed = train(min_timestep=500, max_timestep=500, reg_min_timestep=0, reg_max_timestep=0)
    assert (fixed.min_timestep, fixed.max_timestep, fixed.reg_timestep_range) == (500, 500, (0, 0))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"reg_min_timestep": 600, "reg_max_timestep": 500}, r"train\.reg_min_timestep: must be ≤ train\.reg_max_timestep \(got 600 > 500"),
        ({"max_timestep": 300, "reg_min_timestep": 400}, r"train\.reg_min_timestep: must be ≤ train\.reg_max_timestep \(got 400 > 300"),
        ({"reg_max_timestep": 1001}, r"train\.reg_max_timestep: Input should be less than or equal to 1000 \(got 1001\)"),
        ({"reg_min_timestep": -1}, r"train\.reg_min_timestep: Input should be greater than or equal to 0 \(got -1\)"),
        ({"min_timestep": 600, "max_timestep": 500}, r"train\.min_timestep: must be ≤ train\.max_timestep \(got 600 > 500\)"),
        ({"timestep_start": 600, "timestep_end": 500}, r"train\.min_timestep: must be ≤ train\.max_timestep \(got 600 > 500\)"),
        ({"min_timestep": -1}, r"train\.min_timestep: Input should be greater than or equal to 0 \(got -1\)"),
        ({"max_timestep": 1001}, r"train\.max_timestep: Input should be less than or equal to 1000 \(got 1001\)"),
        ({"timestep_end": 1001}, r"train\.timestep_end: Input should be less than or equal to 1000"),
        ({"use_log_norm_timesteps": "sometimes"}, r"train\.use_log_norm_timesteps"),
    ],
)
def test_invalid_ranges_name_the_key(keys, message):
    with pytest.raises(ParamsError, match=message) as caught:
        validate_params({"train": keys})
    assert isinstance(caught.value, KilnError)


def test_reg_min_above_the_train_max_is_valid_with_its_own_max():
    assert train(min_timestep=0, max_timestep=300, reg_min_timestep=900, reg_max_timestep=1000).reg_timestep_range == (900, 1000)
    assert train(reg_min_timestep=950).reg_timestep_range == (950, 1000)


# --- per-sample ranges ------------------------------------------------------------------------------


def test_ranges_pick_the_reg_range_for_reg_samples():
    is_reg = torch.tensor([True, False, False, True])
    low, high = timesteps.ranges(is_reg, (100, 900), (500, 1000))
    assert low.tolist() == [500, 100, 100, 500] and high.tolist() == [1000, 900, 900, 1000]
    assert low.dtype == high.dtype == torch.long


# --- uniform --------------------------------------------------------------------------------------------


def test_uniform_is_floor_of_a_uniform_draw_over_the_range():
    low = torch.tensor([0, 100, 500, 999, 250])
    high = torch.tensor([1000, 900, 500, 1000, 251])
    drawn = timesteps.uniform(low, high, gen(), T)
    u = torch.rand(5, generator=gen(), dtype=torch.float64).tolist()
    expected = [lo + math.floor(x * (hi - lo)) for lo, hi, x in zip(low.tolist(), high.tolist(), u, strict=True)]
    assert drawn.tolist() == expected
    assert drawn[2] == 500 and drawn[3] == 999 and drawn[4] == 250  # min == max, and one-value ranges


@pytest.mark.parametrize(("low", "high"), [(0, 1000), (100, 900), (990, 1000)])
def test_uniform_is_uniform(low, high):
    n = 100_000
    drawn = timesteps.uniform(torch.full((n,), low), torch.full((n,), high), gen(1), T)
    assert drawn.min() == low and drawn.max() == high - 1  # both ends reached, never high
    values, probs = uniform_probs(low, high)
    statistic, df = chi_square(drawn, values, probs, bins=min(20, high - low))
    assert statistic < chi_square_bound(df)
    assert drawn.double().mean().item() == pytest.approx((low + high - 1) / 2, abs=4 * (high - low) / math.sqrt(12 * n))


def test_fixed_timestep(objectives):
    cfg = train(min_timestep=500, max_timestep=500, reg_min_timestep=0, reg_max_timestep=0)
    is_reg = torch.arange(64) % 3 == 0
    low, high = per_sample(cfg, is_reg)
    for objective in objectives.values():
        drawn = objective.sample_timesteps(low, high, gen())
        assert (drawn[~is_reg] == 500).all() and (drawn[is_reg] == 0).all()


# --- reg ranges, uniform ------------------------------------------------------------------------------


def test_reg_range_in_a_mixed_batch_leaves_the_train_draws_unchanged(objectives):
    objective = objectives["uniform"]
    n = 60_000
    is_reg = torch.rand(n, generator=gen(5)) < 0.4
    with_reg = per_sample(train(min_timestep=100, max_timestep=900, reg_min_timestep=500, reg_max_timestep=1000), is_reg)
    without = per_sample(train(min_timestep=100, max_timestep=900), is_reg)
    g, g_plain = gen(), gen()
    drawn, plain = objective.sample_timesteps(*with_reg, g), objective.sample_timesteps(*without, g_plain)
    reg, rest = drawn[is_reg], drawn[~is_reg]
    assert reg.min() >= 500 and reg.max() < 1000 and rest.min() >= 100 and rest.max() < 900
    assert torch.equal(rest, plain[~is_reg])  # the train samples draw exactly what they did without a reg range
    assert same_next_draw(g, g_plain)  # and the noise drawn next is the same too
    for group, (low, high) in ((reg, (500, 1000)), (rest, (100, 900))):
        statistic, df = chi_square(group, *uniform_probs(low, high), bins=20)
        assert statistic < chi_square_bound(df)
    # The reg samples are the uniform over their own range, not the train range's values shifted.
    assert (plain[is_reg] < 500).any()


def test_unset_reg_range_is_the_train_range(objectives):
    objective = objectives["uniform"]
    cfg = train(min_timestep=200, max_timestep=700)
    is_reg = torch.arange(256) % 2 == 0
    low, high = per_sample(cfg, is_reg)
    assert (low == 200).all() and (high == 700).all()
    no_reg = per_sample(cfg, torch.zeros(256, dtype=torch.bool))
    assert torch.equal(objective.sample_timesteps(low, high, gen()), objective.sample_timesteps(*no_reg, gen()))


@pytest.mark.parametrize("kind", ["uniform", "log_normal"])
def test_all_reg_and_all_train_batches(objectives, kind):
    objective = objectives[kind]
    cfg = train(min_timestep=0, max_timestep=300, reg_min_timestep=700, reg_max_timestep=800)
    for is_reg, (low, high) in ((torch.ones(2000, dtype=torch.bool), (700, 800)), (torch.zeros(2000, dtype=torch.bool), (0, 300))):
        drawn = objective.sample_timesteps(*per_sample(cfg, is_reg), gen())
        assert drawn.min() >= low and drawn.max() < high


# --- log-normal -------------------------------------------------------------------------------------------


def test_log_norm_mu():
    assert timesteps.log_norm_mu(0, 1000) == 0
    assert timesteps.log_norm_mu(500, 1000) == pytest.approx(0.325)
    assert timesteps.log_norm_mu(1000, 1000) == pytest.approx(0.65)
    assert timesteps.log_norm_mu(123, None) == 0.65 and timesteps.log_norm_mu(123, 0) == 0.65


def test_the_objective_uses_the_step_s_mu(objectives):
    objective = objectives["log_normal"]
    low, high = torch.zeros(512, dtype=torch.long), torch.full((512,), 1000)
    drawn = objective.sample_timesteps(low, high, gen(), global_step=300, max_train_steps=1000)
    assert torch.equal(drawn, timesteps.log_normal(low, high, 0.65 * 0.3, gen(), T))
    assert torch.equal(objective.sample_timesteps(low, high, gen(), 300), timesteps.log_normal(low, high, 0.65, gen(), T))
    assert not torch.equal(drawn, timesteps.log_normal(low, high, 0.65, gen(), T))
    # Uniform without use_log_norm_timesteps, whatever the step.
    uniform = objectives["uniform"].sample_timesteps(low, high, gen(), 300, 1000)
    assert torch.equal(uniform, timesteps.uniform(low, high, gen(), T))


@pytest.mark.parametrize(
    ("low", "high", "mu"),
    [
        (0, 1000, 0.65),  # a quarter of the mass is past 999: a few resampling rounds
        (0, 1000, 0.0),
        (100, 300, 0.325),
        (600, 1000, 0.0),  # mostly out of range: many reach the truncated draw
        (990, 1000, 0.65),  # far right tail: nearly all from the truncated draw
        (0, 20, 0.65),  # far left tail
    ],
)
def test_log_normal_matches_the_exact_probabilities(low, high, mu):
    n = 50_000
    drawn = timesteps.log_normal(torch.full((n,), low), torch.full((n,), high), mu, gen(2), T)
    assert drawn.min() >= low and drawn.max() < high
    values, probs = log_normal_probs(low, high, mu)
    bins = min(20, high - low)
    statistic, df = chi_square(drawn, values, probs, bins)
    assert statistic < chi_square_bound(df)
    if high - low == 1000:
        # The test can tell: over the whole range, a μ off by 0.1 is rejected by far. (In a narrow range
        # the truncated distribution is nearly flat whatever μ: there the point is range and termination.)
        _, wrong = log_normal_probs(low, high, mu + 0.1)
        assert chi_square(drawn, values, wrong, bins)[0] > 4 * chi_square_bound(df)


def test_log_normal_unbounded_shape():
    # Over the whole range, with μ = 0 the median of 250·s is 250 (before the truncation at 1000 moves it).
    n = 100_000
    drawn = timesteps.log_normal(torch.zeros(n, dtype=torch.long), torch.full((n,), 1000), 0.0, gen(4), T).double()
    values, probs = log_normal_probs(0, 1000, 0.0)
    mean = (values.double() * probs).sum().item()
    assert drawn.mean().item() == pytest.approx(mean, abs=4 * drawn.std().item() / math.sqrt(n))
    assert (drawn <= 250).double().mean().item() == pytest.approx(probs[:251].sum().item(), abs=0.005)
    assert probs[:251].sum().item() > 0.5  # truncating the right tail puts more than half at or below the median


@pytest.mark.parametrize(("low", "high"), [(990, 1000), (0, 1), (999, 1000), (1, 2), (500, 500)])
def test_log_normal_far_tails_terminate_in_range(low, high):
    n = 10_000
    g = gen(3)
    drawn = timesteps.log_normal(torch.full((n,), low), torch.full((n,), high), 0.65, g, T)
    assert drawn.min() >= low and drawn.max() <= max(high - 1, low)
    if high - low <= 1:
        assert (drawn == low).all()
    # At most LOG_NORM_TRIES resampling rounds, then one uniform per sample: a bounded number of draws.
    replay = gen(3)
    for _ in range(timesteps.LOG_NORM_TRIES):
        torch.randn(n, generator=replay, dtype=torch.float64)
    torch.rand(n, generator=replay, dtype=torch.float64)
    assert same_next_draw(g, replay)


def test_log_normal_reg_range_in_a_mixed_batch(objectives):
    objective = objectives["log_normal"]
    n = 40_000
    is_reg = torch.rand(n, generator=gen(6)) < 0.5
    with_reg = per_sample(train(min_timestep=0, max_timestep=1000, reg_min_timestep=990, reg_max_timestep=1000), is_reg)
    without = per_sample(train(), is_reg)
    drawn = objective.sample_timesteps(*with_reg, gen(), global_step=500, max_train_steps=1000)
    plain = objective.sample_timesteps(*without, gen(), global_step=500, max_train_steps=1000)
    reg, rest = drawn[is_reg], drawn[~is_reg]
    assert reg.min() >= 990 and reg.max() < 1000
    # The train samples take the same values as without a reg range, even those that reached the
    # truncated draw (about 0.3 % here), and follow the exact distribution; so do the reg samples.
    assert torch.equal(rest, plain[~is_reg])
    for group, (low, high) in ((rest, (0, 1000)), (reg, (990, 1000))):
        values, probs = log_normal_probs(low, high, 0.325)
        statistic, df = chi_square(group, values, probs, bins=min(20, high - low))
        assert statistic < chi_square_bound(df)


def test_log_normal_each_group_bounded_by_its_own_range(objectives):
    objective = objectives["log_normal"]
    cfg = train(min_timestep=100, max_timestep=400, reg_min_timestep=800, reg_max_timestep=1000)
    is_reg = torch.arange(5000) % 4 == 0
    drawn = objective.sample_timesteps(*per_sample(cfg, is_reg), gen(7), 10, 100)
    assert drawn[is_reg].min() >= 800 and drawn[is_reg].max() < 1000
    assert drawn[~is_reg].min() >= 100 and drawn[~is_reg].max() < 400
