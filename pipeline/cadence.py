"""When periodic work is due: logging, validation, checkpoints and samples every N steps or epochs.

Named predicates instead of `cfg.x and step % cfg.x == 0` inline (OneTrainer's __needs_sample/save/validate).
"""

from __future__ import annotations


def due(every: int | None, count: int) -> bool:
    """True when `every` is set and `count` (a global step or a finished-epoch number, from 1) is a multiple of it."""
    return bool(every) and count > 0 and count % every == 0


def due_or_last(every: int | None, count: int, last: int) -> bool:
    """`due`, and also at `last` (the run's final step) when `every` is set: a curve always has its end point."""
    return bool(every) and (due(every, count) or count == last)
