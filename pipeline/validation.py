"""Validation loss with fixed noise and fixed timesteps, so its curve is stable (EveryDream2's
stabilised validation): the same held-out images, noise and timesteps at every evaluation."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import KilnError
from pipeline.latents import LatentStore

if TYPE_CHECKING:
    from pipeline.step import TrainingStep


def held_out(plan: list[dict[str, Any]], fraction: float, folder: str | None = None) -> frozenset[str]:
    """The validation images: every image under `folder` (a path relative to the data source), and the
    train images whose image_id hashes below `fraction` (stable as images are added or removed)."""
    chosen = set()
    if folder:
        prefix = folder.strip("/") + "/"
        chosen.update(row["image_id"] for row in plan if row["path"].startswith(prefix))
        if not chosen:
            example = f" (paths look like {plan[0]['path']!r})" if plan else ""
            raise KilnError(f"train.validation_folder: no planned image is under {folder!r}{example}")
    if fraction <= 0:
        return frozenset(chosen)
    for row in plan:
        position = int(hashlib.sha256(f"validation:{row['image_id']}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        if not row["is_reg"] and position < fraction:
            chosen.add(row["image_id"])
    return frozenset(chosen)


class Validator:
    """Held-out images in single-bucket batches, each with noise and a timestep fixed for the run.

    The loss is measured with the training step's active objective (a rectified-flow run validates the
    flow loss, t = timestep / 1000), so a reloaded objective is validated too.
    """

    def __init__(
        self, rows: list[dict[str, Any]], store: LatentStore, index: dict[str, dict[str, Any]],
        min_timestep: int, max_timestep: int, batch_size: int, seed: int,
    ):
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], torch.Tensor]] = []
        by_bucket: dict[str, list[dict[str, Any]]] = {}
        for row in sorted(rows, key=lambda row: row["image_id"]):
            by_bucket.setdefault(row["bucket"], []).append(row)
        span, number = max(max_timestep - min_timestep, 1), 0
        generator = torch.Generator().manual_seed(seed)
        for bucket in sorted(by_bucket):
            for start in range(0, len(by_bucket[bucket]), batch_size):
                chunk = by_bucket[bucket][start : start + batch_size]
                latents = torch.stack([store.read(index[row["cache_key"]])["mean"].float() for row in chunk])
                # Timesteps spread over the training range, one per image, fixed for the whole run.
                timesteps = torch.tensor([min_timestep + ((number + i) * 997) % span for i in range(len(chunk))])
                noise = torch.randn(latents.shape, generator=generator)
                entries = [index[row["cache_key"]] for row in chunk]
                time_ids = torch.tensor(
                    [[*e["original_size"], *e["crop_top_left"], *e["target_size"]] for e in entries], dtype=torch.float32
                )
                self.batches.append((latents, timesteps, noise, [row["caption"] for row in chunk], time_ids))
                number += len(chunk)

    def __len__(self) -> int:
        return sum(len(batch[3]) for batch in self.batches)

    def loss(self, step: TrainingStep) -> float:
        """Mean loss over the held-out images, through the step's encode/predict and its objective."""
        total, count = 0.0, 0
        with step.evaluating():
            for latents, timesteps, noise, captions, time_ids in self.batches:
                noisy = step.objective.with_noise(
                    (latents * step.scaling).to(step.device), timesteps.to(step.device), noise.to(step.device),
                )
                prediction = step.predict(noisy.noisy_latents, noisy.timesteps, step.encode(captions, time_ids))
                per_sample = step.objective.compute_loss(prediction, noisy, torch.ones(len(captions))).per_sample
                total += per_sample.sum().item()
                count += len(captions)
        return total / max(count, 1)
