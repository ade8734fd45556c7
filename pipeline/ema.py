"""An exponential moving average of the trained weights, with EveryDream2's semantics.

Every `ema_update_interval` optimizer steps: ema ← decay · ema + (1 − decay) · weights. The rate comes
from `ema_decay_rate`, or from `ema_strength_target` so that decay^(total_steps / interval) = target.
It shadows exactly the trained tensors (the LoRA's, or the UNet's for a full fine-tune), so one
implementation serves both modes; `swapped()` puts the EMA weights in place to sample or save.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.errors import KilnError
from pipeline.weights import save_safetensors

log = logging.getLogger(__name__)


def decay_for_target(target: float, total_steps: int, interval: int) -> float:
    """The rate whose compounded decay over the run's EMA updates equals `target`."""
    updates = max(total_steps / interval, 1.0)
    return target ** (1.0 / updates)


class EMA:
    def __init__(self, parameters: list[torch.nn.Parameter], decay: float, interval: int, device: str | torch.device = "cpu"):
        if not 0 < decay < 1:
            raise KilnError(f"train.ema_decay_rate: must be in (0, 1), got {decay}")
        self.parameters = parameters
        self.decay = decay
        self.interval = interval
        self.device = torch.device(device)
        # float32 shadows: a 0.9999 decay is below bf16's resolution around 1, so a bf16 EMA would not move.
        self.shadow = [p.detach().to(self.device, torch.float32, copy=True) for p in parameters]

    def step(self, global_step: int) -> bool:
        """Update after optimizer step `global_step` when it is a multiple of the interval."""
        if global_step % self.interval:
            return False
        with torch.no_grad():
            for shadow, param in zip(self.shadow, self.parameters, strict=True):
                shadow.mul_(self.decay).add_(param.detach().to(self.device, torch.float32), alpha=1 - self.decay)
        return True

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (sampling, saving), the trained ones restored after."""
        saved = [p.detach().clone() for p in self.parameters]
        try:
            # Inside the try: a failure part-way through the copy (out of memory) still restores them all.
            with torch.no_grad():
                for shadow, param in zip(self.shadow, self.parameters, strict=True):
                    param.copy_(shadow.to(param.device, param.dtype))
            yield
        finally:
            with torch.no_grad():
                for original, param in zip(saved, self.parameters, strict=True):
                    param.copy_(original)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{index:05d}": tensor.contiguous() for index, tensor in enumerate(self.shadow)}

    def save(self, path: Path) -> Path:
        return save_safetensors(self.state_dict(), path, {"decay": str(self.decay), "interval": str(self.interval)})

    def load(self, path: Path) -> None:
        """Restore the shadows from `save()`'s file (ema_resume_model, or a checkpoint's ema.safetensors)."""
        if not path.is_file():
            raise KilnError(f"train.ema_resume_model: {path} does not exist")
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types, which do not name the file
            raise KilnError(f"{path}: not a readable safetensors file of EMA weights ({exc})") from exc
        if len(state) != len(self.shadow):
            raise KilnError(f"{path}: holds {len(state)} EMA tensors, but this run trains {len(self.shadow)}; was it written for another network?")
        expected = [f"{index:05d}" for index in range(len(self.shadow))]
        if sorted(state) != expected:
            raise KilnError(
                f"{path}: its tensors are not named as Kiln's EMA file names them (00000, 00001, ...); "
                "was it written by something else, such as the LoRA or model weights?"
            )
        for index, shadow in enumerate(self.shadow):
            tensor = state[expected[index]]
            if tensor.shape != shadow.shape:
                raise KilnError(f"{path}: EMA tensor {index} has shape {tuple(tensor.shape)}, the trained one {tuple(shadow.shape)}")
        # Copied only once all are checked, so a refused file leaves the shadows as they were.
        for key, shadow in zip(expected, self.shadow, strict=True):
            shadow.copy_(state[key])
