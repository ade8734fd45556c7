"""Resumable training checkpoints, written atomically (a temporary folder, then a rename).

A checkpoint holds the trainable weights (safetensors), the optimizer and scheduler states (loaded back
with torch.load(weights_only=True): plain tensors and numbers, never arbitrary pickles), the RNG states,
the loader position and global_step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pipeline.errors import KilnError
from pipeline.weights import save_safetensors

log = logging.getLogger(__name__)

PROTECTED = ("interrupted",)


def _weights(params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {f"param_{index:05d}": param.detach().to("cpu").contiguous() for index, param in enumerate(params)}


@dataclass(frozen=True)
class RunIdentity:
    """What determines a run's weights: its declared params, the plan and the code, as flat key -> value.

    Checkpoints record it; a run resumes only its own, and prunes only its own.
    """

    values: dict[str, Any]

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(self.values, sort_keys=True).encode()).hexdigest()

    def differences(self, other: dict[str, Any]) -> list[str]:
        """`key: theirs -> ours` for every key whose value differs from `other`'s (another run's values)."""
        keys = sorted(set(self.values) | set(other))
        return [f"{key}: {other.get(key)!r} -> {self.values.get(key)!r}" for key in keys if other.get(key) != self.values.get(key)]


def _run_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "state.json").read_text()).get("run", {})


def run_checkpoints(root: Path, run: RunIdentity) -> list[Path]:
    """This run's complete checkpoints, oldest step first."""
    return [path for path in checkpoints(root) if _run_of(path).get("id") == run.id]


def save_checkpoint(
    root: Path, name: str, params: list[torch.nn.Parameter], optimizer: Any, scheduler: Any,
    state: dict[str, Any], keep_last: int, extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """extra_weights: more safetensors files for the folder, e.g. {"ema": the EMA's tensors}.
    `state` carries global_step, the loader position and, from the trainer, the run identity."""
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_safetensors(_weights(params), tmp / "weights.safetensors")
    for file_name, tensors in (extra_weights or {}).items():
        save_safetensors(tensors, tmp / f"{file_name}.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_safetensors(rng, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, sort_keys=True, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _prune(root, name, keep_last, state.get("run", {}).get("id"), state["global_step"])
    return final


def _step_of(folder: Path) -> int:
    return json.loads((folder / "state.json").read_text())["global_step"]


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest step first."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".") and (path / "state.json").is_file()]
    return sorted(found, key=lambda path: (_step_of(path), path.name))


def _prune(root: Path, saved: str, keep_last: int, run_id: str | None, global_step: int) -> None:
    """Keep the last `keep_last` periodic checkpoints of the run that just saved; an `interrupted` one of
    that run is superseded by any later save of it. Other runs' checkpoints are left alone."""
    mine = [path for path in checkpoints(root) if _run_of(path).get("id") == run_id]
    periodic = [path for path in mine if path.name not in PROTECTED]
    superseded = [path for path in mine if path.name in PROTECTED and saved not in PROTECTED and _step_of(path) <= global_step]
    for old in periodic[:-keep_last] + superseded:
        shutil.rmtree(old)


def load_checkpoint(folder: Path, params: list[torch.nn.Parameter], optimizer: Any, scheduler: Any) -> dict[str, Any]:
    if not (folder / "state.json").is_file():
        raise KilnError(f"{folder}: not a Kiln checkpoint (no state.json)")
    weights = load_file(str(folder / "weights.safetensors"))
    if len(weights) != len(params):
        raise KilnError(f"{folder}: holds {len(weights)} tensors but this run trains {len(params)}; were the network params changed?")
    with torch.no_grad():
        for index, param in enumerate(params):
            param.copy_(weights[f"param_{index:05d}"])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[key] for key in sorted(k for k in rng if k.startswith("cuda_"))])
    return json.loads((folder / "state.json").read_text())


def resume_source(root: Path, resume: str | None, run: RunIdentity) -> Path | None:
    """What `--resume` names, checked to be this run's:
    - `latest`: this run's newest checkpoint (an error if there is none);
    - `auto`: the same, or None (a fresh start) when this run has none, as under `dvc repro`;
    - a checkpoint folder: that one; if another run wrote it (training on for more steps, say), a warning
      names what differs;
    - None or `none`: a fresh start.
    `latest` with only other runs' checkpoints is an error that names the keys that differ: never a silent resume."""
    if not resume or resume == "none":
        return None
    if resume in ("latest", "auto"):
        mine = run_checkpoints(root, run)
        if mine:
            return mine[-1]
        others = checkpoints(root)
        if resume == "auto":
            if others:
                log.info("%s: no checkpoint of this run (%d of other runs); starting fresh", root, len(others))
            return None
        if not others:
            raise KilnError(f"--resume latest: no checkpoint in {root}")
        source = others[-1]
    else:
        source = Path(resume)
        if not (source / "state.json").is_file():
            raise KilnError(f"--resume {resume}: not a Kiln checkpoint (no state.json)")
        if _run_of(source).get("id") != run.id:
            changed = run.differences(_run_of(source).get("values", {}))
            log.warning("%s belongs to another run (%s); continuing from it, as --resume names it", source, "; ".join(changed))
        return source
    changed = run.differences(_run_of(source).get("values", {}))
    raise KilnError(
        f"--resume {resume}: {source} belongs to another run ({'; '.join(changed[:8])}"
        f"{'; ...' if len(changed) > 8 else ''}). Start this run fresh with --resume none, or restore those values."
    )


def resolve_seed(seed: int, source: Path | None) -> int:
    """train.seed, except -1: a resumed run keeps its checkpoint's seed; a new run draws one and logs it."""
    if seed != -1:
        return seed
    if source is not None and (source / "state.json").is_file():
        seed = json.loads((source / "state.json").read_text())["loader"]["seed"]
    else:
        seed = secrets.randbelow(2**31)
    log.info("train.seed is -1: using seed %d", seed)
    return seed


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly: the trained weights, optimizer,
    schedule, loader position, global_step and the EMA. Only the main process writes."""

    def __init__(
        self, root: Path, trainable: list[torch.nn.Parameter], optimizer: Any, scheduler: Any, loader: Any,
        ema: Any, keep_last: int, run: RunIdentity, is_main: bool = True,
    ):
        self.root, self.trainable, self.optimizer, self.scheduler = root, trainable, optimizer, scheduler
        self.loader, self.ema, self.keep_last, self.run, self.is_main = loader, ema, keep_last, run, is_main
        if is_main:
            root.mkdir(parents=True, exist_ok=True)  # a declared output, even before the first save

    def save(self, name: str, global_step: int) -> Path:
        if not self.is_main:
            return self.root / name
        return save_checkpoint(
            self.root, name, self.trainable, self.optimizer, self.scheduler,
            {"global_step": global_step, "loader": self.loader.state_dict(), "run": {"id": self.run.id, "values": self.run.values}},
            keep_last=self.keep_last,
            extra_weights={"ema": self.ema.state_dict()} if self.ema is not None else None,
        )

    def finish(self, global_step: int) -> None:
        """The run completed: its `interrupted` checkpoint is superseded by the outputs."""
        if self.is_main and self.root.is_dir():
            _prune(self.root, "finished", self.keep_last, self.run.id, global_step)

    def restore(self, source: Path, seed: int) -> int:
        """Load `source` into this run; returns its global_step. The seed must match (it fixes every draw)."""
        state = load_checkpoint(source, self.trainable, self.optimizer, self.scheduler)
        if state["loader"]["seed"] != seed:
            raise KilnError(f"{source}: saved with train.seed={state['loader']['seed']}, but this run has {seed}")
        self.loader.load_state_dict(state["loader"])
        if self.ema is not None and (source / "ema.safetensors").is_file():
            self.ema.load(source / "ema.safetensors")
        log.info("resumed from %s at step %d", source, state["global_step"])
        return state["global_step"]
