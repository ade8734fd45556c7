"""Resumable training checkpoints, written atomically (a temporary folder, then a rename).

A checkpoint holds the trainable weights (safetensors), the optimizer and scheduler states (loaded back
with torch.load(weights_only=True): plain tensors and numbers, never arbitrary pickles), the RNG states,
the loader position and global_step.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
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


def save_checkpoint(
    root: Path, name: str, params: list[torch.nn.Parameter], optimizer: Any, scheduler: Any,
    state: dict[str, Any], keep_last: int, extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """extra_weights: more safetensors files for the folder, e.g. {"ema": the EMA's tensors}."""
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
    _prune(root, keep_last)
    return final


def _step_of(folder: Path) -> int:
    return json.loads((folder / "state.json").read_text())["global_step"]


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest step first."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".") and (path / "state.json").is_file()]
    return sorted(found, key=lambda path: (_step_of(path), path.name))


def _prune(root: Path, keep_last: int) -> None:
    periodic = [path for path in checkpoints(root) if path.name not in PROTECTED]
    for old in periodic[:-keep_last]:
        shutil.rmtree(old)


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


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


def resume_source(root: Path, resume: str | None) -> Path | None:
    """What `--resume` names: `latest` (the highest step under root) or a checkpoint folder; None for a new run."""
    if not resume:
        return None
    if resume != "latest":
        return Path(resume)
    source = latest_checkpoint(root)
    if source is None:
        raise KilnError(f"--resume latest: no checkpoint in {root}")
    return source


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
        ema: Any, keep_last: int, is_main: bool = True,
    ):
        self.root, self.trainable, self.optimizer, self.scheduler = root, trainable, optimizer, scheduler
        self.loader, self.ema, self.keep_last, self.is_main = loader, ema, keep_last, is_main
        if is_main:
            root.mkdir(parents=True, exist_ok=True)  # a declared output, even before the first save

    def save(self, name: str, global_step: int) -> Path:
        if not self.is_main:
            return self.root / name
        return save_checkpoint(
            self.root, name, self.trainable, self.optimizer, self.scheduler,
            {"global_step": global_step, "loader": self.loader.state_dict()}, keep_last=self.keep_last,
            extra_weights={"ema": self.ema.state_dict()} if self.ema is not None else None,
        )

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
