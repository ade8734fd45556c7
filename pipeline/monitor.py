"""Training logs: TensorBoard under models/<name>/logs, and dvclive's metrics.json and plots/ so that
`dvc plots show` and `dvc exp show` see the run."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from pipeline.tables import write_json, write_table

# train.log_timesteps: every drawn timestep, with the image and step it was drawn for.
TIMESTEPS_SCHEMA = pa.schema(
    [("global_step", pa.int64()), ("image_id", pa.string()), ("is_reg", pa.bool_()), ("timestep", pa.int32())]
)


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, events: Path | None = None, fresh: bool = True):
        """TensorBoard events go to `events` (default run_dir/logs); `fresh` clears it first, so a run
        redone from the start does not append a second curve to its old one."""
        self.enabled = enabled
        if not enabled:  # ranks other than the main process log nothing
            return
        import shutil

        from dvclive import Live
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        events = events or run_dir / "logs"
        if fresh and events != run_dir / "logs":
            shutil.rmtree(events, ignore_errors=True)
        self.tensorboard = SummaryWriter(log_dir=str(events))
        # Our dvc.yaml declares the outputs; dvclive must not edit it or commit experiments itself.
        settings = {"dir": str(run_dir), "save_dvc_exp": False, "dvcyaml": False, "report": None}
        try:
            self.live = Live(**settings)
        except Exception as exc:
            # dvclive asks git for the current revision before checking that one exists, and fails in
            # a repository with no commit yet; it then only needs to write files, so skip its DVC probe.
            if "Empty git repo" not in str(exc):
                raise
            from unittest import mock

            with mock.patch("dvclive.live.get_dvc_repo", return_value=None):
                self.live = Live(**settings)

    def scalars(self, step: int, values: dict[str, float], plot: tuple[str, ...] = ("loss", "lr")) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.tensorboard.add_scalar(name, value, step)
        self.live.step = step
        for name in plot:
            if name in values:
                self.live.log_metric(name, values[name])
        self.live.next_step()

    def histogram(self, step: int, name: str, values: torch.Tensor) -> None:
        if self.enabled and values.numel():
            self.tensorboard.add_histogram(name, values.detach().float().cpu(), step)

    def image(self, step: int, name: str, image: Any) -> None:
        if self.enabled:
            import numpy as np

            self.tensorboard.add_image(name, np.asarray(image), step, dataformats="HWC")

    def finish(self, summary: dict[str, Any]) -> None:
        """Close the logs and write metrics.json: the summary alone (what judges a run), not dvclive's copy
        of the last logged loss, lr and step, so `dvc exp show` and `dvc metrics diff` stay narrow."""
        if not self.enabled:
            return
        self.tensorboard.close()
        self.live.end()
        write_json(summary, Path(self.live.metrics_file))


def lora_block_magnitudes(model: Any) -> dict[str, float]:
    """Mean |weight| of the LoRA matrices per UNet block (sd-trainer's LoRA weight monitoring)."""
    named = [(name, param) for name, param in model.named_parameters() if "lora_" in name]
    if not named:
        return {}
    # One host sync for all of them (a `.item()` per tensor is ~2 per LoRA layer), summed in the same order.
    sums = torch.stack([param.detach().abs().sum() for _, param in named]).tolist()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for (name, param), total in zip(named, sums, strict=True):
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
        totals[block][0] += total
        totals[block][1] += param.numel()
    return {f"lora_weight/{block}": total / count for block, (total, count) in sorted(totals.items()) if count}


class Throughput:
    """Images per second over the training steps alone.

    The time between two steps (loading the batch, forward, backward, optimizer) counts; what runs inside
    `excluding()` (sampling, validation, checkpoints) does not, and is added up per name instead. The first
    step, which pays for allocation and kernel choice, is not counted either.
    """

    def __init__(self, clock: Callable[[], float] | None = None):
        self.clock = clock or time.perf_counter
        self.images = 0
        self.seconds = 0.0
        self.other_seconds: dict[str, float] = defaultdict(float)
        self._mark: float | None = None  # when the last counted interval ended

    def step_done(self, images: int) -> None:
        now = self.clock()
        if self._mark is not None:
            self.seconds += now - self._mark
            self.images += images
        self._mark = now

    @contextlib.contextmanager
    def excluding(self, name: str) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            elapsed = self.clock() - start
            self.other_seconds[name] += elapsed
            if self._mark is not None:
                self._mark += elapsed

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def write_timesteps(rows: list[dict[str, Any]], path: Path) -> None:
    """logs/timesteps.parquet for train.log_timesteps."""
    write_table(rows, TIMESTEPS_SCHEMA, path)


def draw_loss_curve(losses: list[float], validation: list[tuple[int, float]], path: Path, first_step: int = 1) -> Path:
    """The training loss per step (blue) and the validation loss (orange dots) as a PNG, to look at without
    TensorBoard or a network. Deterministic bytes for identical values (DVC tracks it)."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 360, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = losses + [value for _, value in validation]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    span = (high - low) or 1.0
    last = first_step + max(len(losses) - 1, 1)

    def point(step: int, value: float) -> tuple[float, float]:
        x = margin + (step - first_step) / max(last - first_step, 1) * (width - 2 * margin)
        return x, height - margin - (value - low) / span * (height - 2 * margin)

    draw.rectangle((margin, margin, width - margin, height - margin), outline="black")
    draw.text((margin, 12), f"loss, steps {first_step}-{last}", fill="black")
    draw.text((4, margin - 6), f"{high:.4g}", fill="black")
    draw.text((4, height - margin - 6), f"{low:.4g}", fill="black")
    if len(losses) > 1:
        draw.line([point(first_step + i, value) for i, value in enumerate(losses)], fill=(31, 119, 180), width=2)
    for step, value in validation:
        x, y = point(step, value)
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(255, 127, 14))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
