"""Resumable training checkpoints, written atomically (a temporary folder, then a rename).

A checkpoint holds the trainable weights (safetensors), the optimizer and scheduler states (loaded back
with torch.load(weights_only=True): plain tensors and numbers, never arbitrary pickles), the RNG states,
the loader position and global_step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import KilnError

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
    save_file(_weights(params), str(tmp / "weights.safetensors"))
    for file_name, tensors in (extra_weights or {}).items():
        save_file(tensors, str(tmp / f"{file_name}.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
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
