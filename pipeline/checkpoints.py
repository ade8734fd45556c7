"""Resumable training checkpoints, written atomically (a temporary folder, then a rename).

A checkpoint holds the trainable weights (safetensors), the optimizer and scheduler states (loaded back
with torch.load(weights_only=True): plain tensors and numbers, never arbitrary pickles), the RNG states,
the loader position and global_step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from pipeline.errors import KilnError
from pipeline.models import refused_pickle
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


def _reason(exc: BaseException) -> str:
    """An error in one line: its first sentence (torch's zip reader goes on for a paragraph)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{exc.__class__.__name__}: {re.split(r'(?<=[a-z)])[.] (?=[A-Z])', first)[0]}"


def _read_state(folder: Path) -> dict[str, Any]:
    """state.json, checked to hold what a restore needs; else a KilnError naming it."""
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 or not JSON, as a truncated write leaves it
        raise KilnError(f"{path}: damaged ({_reason(exc)})") from None
    if not (isinstance(state, dict) and isinstance(state.get("global_step"), int) and "seed" in (state.get("loader") or {})):
        raise KilnError(f"{path}: damaged (no global_step or loader seed)")
    return state


def _run_of(folder: Path) -> dict[str, Any]:
    return _read_state(folder).get("run", {})


def run_checkpoints(root: Path, run: RunIdentity) -> list[Path]:
    """This run's complete checkpoints, oldest step first."""
    return [path for path, state in _listing(root) if state.get("run", {}).get("id") == run.id]


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Any failure to read one of a checkpoint's files, as one line naming it."""
    if not path.is_file():
        raise KilnError(f"{path}: missing")
    try:
        yield
    except pickle.UnpicklingError as exc:
        raise KilnError(f"{path}: refused: it holds Python objects beyond tensors ({refused_pickle(exc)})") from None
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError) as exc:  # truncated, or another format
        raise KilnError(f"{path}: damaged ({_reason(exc)})") from None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with _reading(path):
        return load_file(str(path))


def _torch_state(path: Path, mmap: bool = False) -> Any:
    """An optimizer or scheduler state: plain tensors and numbers (weights_only), never arbitrary pickles."""
    with _reading(path):
        return torch.load(path, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))


def check_checkpoint(folder: Path) -> dict[str, Any]:
    """Its state, or a KilnError naming the first damaged or refused file. Cheap but real: every
    safetensors header must cover its file, and the optimizer and scheduler states must unpickle as
    tensors and numbers (memory-mapped: their tensor data is not read)."""
    state = _read_state(folder)
    names = {"weights.safetensors", "rng.safetensors"} | {path.name for path in folder.glob("*.safetensors")}
    for name in sorted(names):
        with _reading(folder / name), safe_open(str(folder / name), "pt") as handle:
            handle.keys()
    for name in ("optimizer.pt", "scheduler.pt"):
        _torch_state(folder / name, mmap=True)
    return state


def save_checkpoint(
    root: Path, name: str, params: list[torch.nn.Parameter], optimizer: Any, scheduler: Any,
    state: dict[str, Any], keep_last: int, extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """extra_weights: more safetensors files for the folder, e.g. {"ema": the EMA's tensors}.
    `state` carries global_step, the loader position and, from the trainer, the run identity."""
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    tensors = {"weights": _weights(params), **(extra_weights or {}), "rng": rng}
    try:
        tmp.mkdir()
        for file_name, values in tensors.items():
            save_safetensors(values, tmp / f"{file_name}.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, sort_keys=True, indent=2))
    except (OSError, RuntimeError, SafetensorError) as exc:
        # A full disk: OSError(ENOSPC), or from torch.save a RuntimeError ("enforce fail at
        # inline_container.cc") that names no file. The partial folder goes; the earlier checkpoints stay.
        shutil.rmtree(tmp, ignore_errors=True)
        raise KilnError(
            f"{final}: cannot write this checkpoint ({_reason(exc)}); free disk space (or check the folder is "
            "writable), then resume: the earlier checkpoints are kept"
        ) from None
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _prune(root, name, keep_last, state.get("run", {}).get("id"), state["global_step"])
    return final


def _folders(root: Path) -> list[Path]:
    """Folders that look like complete checkpoints: a state.json, and not a `.name.tmp` being written."""
    if not root.is_dir():
        return []
    return [path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".") and (path / "state.json").is_file()]


_reported: set[Path] = set()  # checkpoints with an unreadable state.json, warned about once per process


def _listing(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, state) of the complete checkpoints whose state.json can be trusted, oldest step first.

    One whose state.json cannot be read is warned about and left on disk, neither resumed nor pruned:
    its run is unknown, so it may be another run's (which a run never prunes), and its weights may still
    be worth recovering by hand. Deleting it is the user's call."""
    found = []
    for path in _folders(root):
        try:
            found.append((path, _read_state(path)))
        except KilnError as exc:
            if path not in _reported:
                _reported.add(path)
                log.warning("%s; this checkpoint is never resumed or pruned: delete it", exc)
    return sorted(found, key=lambda item: (item[1]["global_step"], item[0].name))


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints with a readable state.json, oldest step first."""
    return [path for path, _ in _listing(root)]


def _prune(root: Path, saved: str, keep_last: int, run_id: str | None, global_step: int) -> None:
    """Keep the last `keep_last` periodic checkpoints of the run that just saved; an `interrupted` one of
    that run is superseded by any later save of it. Other runs' checkpoints are left alone."""
    mine = [(path, state) for path, state in _listing(root) if state.get("run", {}).get("id") == run_id]
    periodic = [path for path, _ in mine if path.name not in PROTECTED]
    superseded = [
        path for path, state in mine if path.name in PROTECTED and saved not in PROTECTED and state["global_step"] <= global_step
    ]
    for old in periodic[:-keep_last] + superseded:
        shutil.rmtree(old)


def load_checkpoint(folder: Path, params: list[torch.nn.Parameter], optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Every file is read before anything is applied: a damaged or refused one leaves this run's state as it was."""
    if not (folder / "state.json").is_file():
        raise KilnError(f"{folder}: not a Kiln checkpoint (no state.json)")
    state = _read_state(folder)
    weights = _tensors(folder / "weights.safetensors")
    if len(weights) != len(params):
        raise KilnError(f"{folder}: holds {len(weights)} tensors but this run trains {len(params)}; were the network params changed?")
    optimizer_state = _torch_state(folder / "optimizer.pt")
    scheduler_state = _torch_state(folder / "scheduler.pt")
    rng = _tensors(folder / "rng.safetensors")
    optimizer.load_state_dict(optimizer_state)  # first: it refuses another network's groups before a weight changes
    scheduler.load_state_dict(scheduler_state)
    with torch.no_grad():
        for index, param in enumerate(params):
            param.copy_(weights[f"param_{index:05d}"])
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[key] for key in sorted(k for k in rng if k.startswith("cuda_"))])
    return state


def resume_source(root: Path, resume: str | None, run: RunIdentity) -> Path | None:
    """What `--resume` names, checked to be this run's and intact (check_checkpoint):
    - `latest`: this run's newest valid checkpoint (an error if there is none at all); a damaged or refused
      one is skipped with a warning naming its file, and when none is valid the run starts fresh, saying so;
    - `auto`: the same, or None (a fresh start) when this run has none, as under `dvc repro`;
    - a checkpoint folder: that one, or an error naming its damaged file; if another run wrote it
      (training on for more steps, say), a warning names what differs;
    - None or `none`: a fresh start.
    `latest` with only other runs' checkpoints is an error that names the keys that differ: never a silent resume."""
    if not resume or resume == "none":
        return None
    if resume in ("latest", "auto"):
        mine = run_checkpoints(root, run)
        for source in reversed(mine):
            try:
                check_checkpoint(source)
            except KilnError as exc:
                log.warning("%s; skipping this checkpoint", exc)
                continue
            return source
        if mine:
            log.warning("%s: none of this run's %d checkpoints can be resumed; starting fresh", root, len(mine))
            return None
        others = checkpoints(root)
        if not others and _folders(root):  # only checkpoints whose state.json is damaged, each warned about
            log.warning("%s: no checkpoint can be resumed; starting fresh", root)
            return None
        if resume == "auto":
            if others:
                log.info("%s: no checkpoint of this run (%d of other runs); starting fresh", root, len(others))
            return None
        if not others:
            raise KilnError(f"--resume latest: no checkpoint in {root}; start this run fresh with --resume auto (the default) or --resume none")
        source = others[-1]
    else:
        source = Path(resume)
        if not (source / "state.json").is_file():
            raise KilnError(f"--resume {resume}: not a Kiln checkpoint (no state.json)")
        try:
            check_checkpoint(source)
        except KilnError as exc:
            raise KilnError(f"{exc}; delete this checkpoint or resume another") from None
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


@dataclass
class LossHistory:
    """The loss of every optimizer step so far and the (global_step, validation loss) points: in every
    checkpoint, so a resumed run's metrics.json and loss.png are the uninterrupted run's, not its tail's."""

    losses: list[float] = field(default_factory=list)
    validation_points: list[tuple[int, float]] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {"losses": self.losses, "validation_points": [list(point) for point in self.validation_points]}

    def load(self, state: dict[str, Any] | None) -> None:
        """In place (the loop appends to these lists); a checkpoint from before histories leaves them empty."""
        if isinstance(state, dict):
            self.losses[:] = [float(loss) for loss in state.get("losses", [])]
            self.validation_points[:] = [(int(step), float(loss)) for step, loss in state.get("validation_points", [])]


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly: the trained weights, optimizer,
    schedule, loader position, global_step, the EMA and the loss history. Only the main process writes."""

    def __init__(
        self, root: Path, trainable: list[torch.nn.Parameter], optimizer: Any, scheduler: Any, loader: Any,
        ema: Any, keep_last: int, run: RunIdentity, is_main: bool = True, started_at: float | None = None,
    ):
        self.root, self.trainable, self.optimizer, self.scheduler = root, trainable, optimizer, scheduler
        self.loader, self.ema, self.keep_last, self.run, self.is_main = loader, ema, keep_last, run, is_main
        self.started_at = started_at  # unix time the run first started: a resumed run keeps it (its metadata says so)
        self.history = LossHistory()
        if is_main:
            root.mkdir(parents=True, exist_ok=True)  # a declared output, even before the first save

    def save(self, name: str, global_step: int) -> Path:
        if not self.is_main:
            return self.root / name
        return save_checkpoint(
            self.root, name, self.trainable, self.optimizer, self.scheduler,
            {"global_step": global_step, "loader": self.loader.state_dict(), "run": {"id": self.run.id, "values": self.run.values},
             "started_at": self.started_at, "history": self.history.state()},
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
        self.started_at = state.get("started_at") or self.started_at  # older checkpoints did not record it
        self.history.load(state.get("history"))
        if self.ema is not None and (source / "ema.safetensors").is_file():
            self.ema.load(source / "ema.safetensors")
        log.info("resumed from %s at step %d", source, state["global_step"])
        return state["global_step"]
