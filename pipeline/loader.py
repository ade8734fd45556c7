"""The bucketed latent loader: plan.parquet + the latent store -> training batches.

Each epoch's schedule is a pure function of (plan, seed, epoch): repeats are expanded (fractional
EveryDream2 multiply drawn per epoch), images are grouped by (bucket, batch_id) so a batch never mixes
sizes, groups are cut into batches, and the batch order is shuffled. Every per-sample draw (latent
noise, flip, caption dropout and shuffle) is seeded by (seed, epoch, batch, position), so a batch is
the same whichever worker builds it, and a loader restored from (epoch, batch index) yields exactly
the batches the uninterrupted one would have.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors

from pipeline.errors import KilnError
from pipeline.latents import LatentStore, checked, is_remote
from pipeline.params import TrainParams
from pipeline.tables import read_table

# Streams of the per-epoch and per-sample generators, so that no two draws share a stream.
COUNT_STREAM, ORDER_STREAM, SAMPLE_STREAM = 0, 1, 2


@dataclass(frozen=True)
class ScheduledBatch:
    epoch: int
    index: int  # position in this rank's epoch
    bucket: str
    rows: tuple[int, ...]  # plan row indices


def epoch_counts(repeats: list[float], seed: int, epoch: int) -> list[int]:
    """How often each row trains this epoch: the whole part of its repeats always, the fraction as a
    draw seeded by (seed, epoch), so that over many epochs it averages out (EveryDream2 multiply)."""
    draws = np.random.default_rng([seed, epoch, COUNT_STREAM]).random(len(repeats))
    return [int(math.floor(r)) + int(draw < r - math.floor(r)) for r, draw in zip(repeats, draws, strict=True)]


def epoch_schedule(plan: list[dict[str, Any]], seed: int, epoch: int, batch_size: int, remainder: str) -> list[ScheduledBatch]:
    """All batches of one epoch, in training order, before splitting across ranks."""
    rng = np.random.default_rng([seed, epoch, ORDER_STREAM])
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for row, count in enumerate(epoch_counts([p["repeats"] for p in plan], seed, epoch)):
        groups[(plan[row]["bucket"], plan[row]["batch_id"] or "")].extend([row] * count)
    cut: list[tuple[str, list[int]]] = []
    for (bucket, _), items in sorted(groups.items()):
        shuffled = [items[i] for i in rng.permutation(len(items))]
        for start in range(0, len(shuffled), batch_size):
            batch = shuffled[start : start + batch_size]
            if len(batch) < batch_size:
                if remainder == "drop":
                    continue
                if remainder == "fill":
                    # EveryDream2 tops a short batch up with random images of the same group.
                    batch = batch + [items[i] for i in rng.integers(0, len(items), batch_size - len(batch))]
            cut.append((bucket, batch))
    order = rng.permutation(len(cut))
    return [ScheduledBatch(epoch, position, cut[i][0], tuple(cut[i][1])) for position, i in enumerate(order)]


def rank_slice(batches: list[ScheduledBatch], rank: int, world: int) -> list[ScheduledBatch]:
    """This rank's batches: disjoint from every other rank's and of the same length (the remainder of
    len(batches) / world is left out), so no rank waits at the end of an epoch."""
    per_rank = len(batches) // world
    mine = batches[rank::world][:per_rank]
    return [ScheduledBatch(b.epoch, position, b.bucket, b.rows) for position, b in enumerate(mine)]


def process_caption(caption: str, rng: np.random.Generator, dropout: float, shuffle: bool, keep: int, tag_dropout: float) -> str:
    """kohya's order: caption dropout empties it; then the parts after the first `keep` are shuffled;
    then each of those parts is dropped with tag_dropout."""
    draws = rng.random(2)
    if draws[0] < dropout:
        return ""
    parts = [part.strip() for part in caption.split(",") if part.strip()]
    kept, rest = parts[:keep], parts[keep:]
    if shuffle:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    if tag_dropout > 0:
        rest = [part for part, draw in zip(rest, rng.random(len(rest)), strict=True) if draw >= tag_dropout]
    return ", ".join(kept + rest)


def batch_generator(seed: int, epoch: int, batch_number: int) -> torch.Generator:
    """The generator of one batch's training draws (noise, timesteps, embedding perturbation).

    It depends only on (seed, epoch, batch number), so a resumed run draws exactly what the uninterrupted
    one would have, with no generator state to save. Reflow seeds its draws with epoch -1 - iteration.
    """
    return torch.Generator().manual_seed(hash((seed, epoch, batch_number)) & (2**63 - 1))


class LatentDataset(torch.utils.data.Dataset):
    """Reads one sample by (plan row, epoch, batch, position): random access into its shard via the index."""

    def __init__(self, plan: list[dict[str, Any]], store: Path, index: dict[str, dict[str, Any]], cfg: TrainParams):
        self.plan, self.store, self.index, self.cfg = plan, LatentStore(store, keep_open=True), index, cfg

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, item: tuple[int, int, int, int]) -> dict[str, Any]:
        row_index, epoch, batch, position = item
        row, cfg = self.plan[row_index], self.cfg
        rng = np.random.default_rng([cfg.seed, epoch, batch, position, SAMPLE_STREAM])
        flip_p = row["flip_p"] if row["flip_p"] is not None else cfg.flip_p
        flip = bool(rng.random() < flip_p)
        entry = self.index[row["flip_cache_key"] if flip else row["cache_key"]]
        try:
            payload = self.store.read_bytes(entry)
        except KilnError as exc:
            # Raised in a DataLoader worker, it would reach the trainer rewrapped with the worker's traceback
            # in its text; it travels as data instead, and the trainer raises it as the one line it is.
            return {"error": str(exc)}
        return self.sample(row_index, entry, load_tensors(payload), rng)

    def sample(self, row_index: int, entry: dict[str, Any], tensors: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """One training sample from its stored tensors: latent draw, then caption processing."""
        row, cfg = self.plan[row_index], self.cfg
        latent = tensors["mean"].float()
        if cfg.latent_sampling == "sample":
            generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
            latent = latent + tensors["std"].float() * torch.randn(latent.shape, generator=generator)
        dropout = row["cond_dropout"] if row["cond_dropout"] is not None else cfg.cond_dropout
        shuffle = row["shuffle_tags"] if row["shuffle_tags"] is not None else cfg.shuffle_tags
        caption = process_caption(row["caption"], rng, dropout, shuffle, cfg.keep_tags, cfg.caption_tag_dropout_rate)
        return {
            "latents": latent,  # (4, H / 8, W / 8)
            "mask": tensors["mask"].float() if "mask" in tensors else None,
            "caption": caption,
            "is_reg": row["is_reg"],
            "loss_weight": row["loss_weight"],
            # SDXL add_time_ids: original (h, w), crop top-left, target (h, w).
            "time_ids": torch.tensor([*entry["original_size"], *entry["crop_top_left"], *entry["target_size"]], dtype=torch.float32),
            "image_id": row["image_id"],
        }


def collate(samples: list[dict[str, Any]], minibatch_repeat: int = 1) -> dict[str, Any]:
    """Stack samples into a batch; with minibatch_repeat k, each sample appears k times in a row."""
    errors = [sample["error"] for sample in samples if "error" in sample]
    if errors:
        return {"error": errors[0]}
    samples = [sample for sample in samples for _ in range(minibatch_repeat)]
    latents = torch.stack([sample["latents"] for sample in samples])
    masks = None
    if any(sample["mask"] is not None for sample in samples):
        # Samples without a mask train on every cell.
        masks = torch.stack([s["mask"] if s["mask"] is not None else torch.ones_like(latents[0, :1]) for s in samples])
    return {
        "latents": latents,  # (B, 4, H / 8, W / 8)
        "masks": masks,  # (B, 1, H / 8, W / 8) or None
        "captions": [sample["caption"] for sample in samples],
        "is_reg": torch.tensor([sample["is_reg"] for sample in samples], dtype=torch.bool),
        "loss_weight": torch.tensor([sample["loss_weight"] for sample in samples], dtype=torch.float32),
        "time_ids": torch.stack([sample["time_ids"] for sample in samples]),  # (B, 6)
        "image_ids": [sample["image_id"] for sample in samples],
    }


def trained_rows(plan: Path | list[dict[str, Any]], exclude: frozenset[str]) -> list[dict[str, Any]]:
    """The plan's rows (a plan.parquet path, or rows already read) minus `exclude`, the held-out
    (validation) image ids, in image_id order."""
    rows = read_table(plan, "balance") if isinstance(plan, (str, Path)) else plan
    return sorted((row for row in rows if row["image_id"] not in exclude), key=lambda row: row["image_id"])


class _EpochPosition:
    """What both loaders share: the (epoch, batch number) position, and the generator it seeds."""

    cfg: TrainParams
    epoch: int
    batch_index: int  # batches yielded so far in this epoch

    def generator(self) -> torch.Generator:
        """The training draws of the batch just yielded (batch_generator at this position)."""
        return batch_generator(self.cfg.seed, self.epoch, self.batch_index)


class LatentLoader(_EpochPosition):
    """Iterates one epoch per `for` loop, from the current (epoch, batch index); resumable via state_dict."""

    def __init__(
        self, plan: Path | list[dict[str, Any]], store: Path, cfg: TrainParams, rank: int = 0, world: int = 1,
        logs_dir: Path | None = None, pin_memory: bool | None = None, exclude: frozenset[str] = frozenset(),
    ):
        self.plan = trained_rows(plan, exclude)
        self.store, self.cfg, self.rank, self.world, self.logs_dir = store, cfg, rank, world, logs_dir
        self.index = {row["cache_key"]: row for row in read_table(store / "index.parquet", "cache")}
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.epoch, self.batch_index = 0, 0
        for row in self.plan:
            flip_p = row["flip_p"] if row["flip_p"] is not None else cfg.flip_p
            if flip_p > 0 and row["flip_cache_key"] is None:
                raise KilnError(
                    f"{row['path']}: flip_p is {flip_p} but the cache holds no flipped latent for it; set "
                    "cache.flip_latents: true and rerun `kiln cache`, or set train.flip_p: 0"
                )
            if row["cache_key"] not in self.index:
                raise KilnError(f"{row['path']}: its latent is not in {store}/index.parquet; rerun `kiln cache`")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.cfg.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.cfg.seed:
            raise KilnError(f"the checkpoint's loader used train.seed={state['seed']}, not {self.cfg.seed}")
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]

    def schedule(self, epoch: int) -> list[ScheduledBatch]:
        batches = epoch_schedule(self.plan, self.cfg.seed, epoch, self.cfg.batch_size, self.cfg.bucket_remainder)
        return rank_slice(batches, self.rank, self.world)

    def __len__(self) -> int:
        return len(self.schedule(self.epoch))

    def _write_schedule(self, batches: list[ScheduledBatch]) -> None:
        if not (self.cfg.write_schedule and self.logs_dir):
            return
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        lines = ["batch\tbucket\timage_ids"] + [
            f"{b.index}\t{b.bucket}\t{','.join(self.plan[row]['image_id'] for row in b.rows)}" for b in batches
        ]
        (self.logs_dir / f"schedule_epoch_{self.epoch}_rank_{self.rank}.tsv").write_text("\n".join(lines) + "\n")

    def __iter__(self):
        batches = self.schedule(self.epoch)
        if self.batch_index == 0:
            self._write_schedule(batches)
        remaining = batches[self.batch_index :]
        sampler = [[(row, b.epoch, b.index, position) for position, row in enumerate(b.rows)] for b in remaining]
        loader = torch.utils.data.DataLoader(
            LatentDataset(self.plan, self.store, self.index, self.cfg), batch_sampler=sampler,
            num_workers=self.cfg.workers, collate_fn=functools.partial(collate, minibatch_repeat=self.cfg.minibatch_repeat),
            pin_memory=self.pin_memory, persistent_workers=False,
        )
        for batch in loader:
            if "error" in batch:
                raise KilnError(batch["error"])
            self.batch_index += 1
            yield batch
        self.epoch, self.batch_index = self.epoch + 1, 0


class StreamingLatentLoader(_EpochPosition):
    """Streams shards with webdataset, for stores that only allow sequential reads (object storage).

    One pipeline per bucket, so a batch never mixes sizes; buckets are mixed in proportion to their
    samples per epoch. The local index (data/latents/index.parquet) lists the shards and checksums.
    Repeats, flips and caption processing follow the same params as LatentLoader; the order is a seeded
    shuffle buffer rather than a global permutation, and each rank streams its own share of the shards.
    """

    def __init__(
        self, plan: Path | list[dict[str, Any]], index_path: Path, base_url: str, cfg: TrainParams, rank: int = 0,
        world: int = 1, shuffle_buffer: int = 256, exclude: frozenset[str] = frozenset(),
    ):
        self.plan = trained_rows(plan, exclude)
        self.index = {row["cache_key"]: row for row in read_table(index_path, "cache")}
        self.base_url, self.cfg, self.rank, self.world = base_url.rstrip("/"), cfg, rank, world
        self.shuffle_buffer, self.epoch, self.batch_index = shuffle_buffer, 0, 0
        self.row_of: dict[str, tuple[int, bool]] = {}
        for number, row in enumerate(self.plan):
            self.row_of[row["cache_key"]] = (number, False)
            if row["flip_cache_key"]:
                self.row_of[row["flip_cache_key"]] = (number, True)
        self.dataset = LatentDataset(self.plan, Path("."), self.index, cfg)

    def __len__(self) -> int:
        """Expected batches per epoch for this rank (streaming cannot know the exact count in advance)."""
        counts = epoch_counts([row["repeats"] for row in self.plan], self.cfg.seed, self.epoch)
        per_bucket: dict[str, int] = defaultdict(int)
        for row, count in zip(self.plan, counts, strict=True):
            per_bucket[row["bucket"]] += count
        rounding = math.floor if self.cfg.bucket_remainder == "drop" else math.ceil
        return sum(rounding(total / self.cfg.batch_size) for total in per_bucket.values()) // self.world

    def _shards(self, bucket: str) -> list[str]:
        shards = sorted({self.index[key]["shard"] for key, (row, _) in self.row_of.items() if self.plan[row]["bucket"] == bucket})
        return [f"{self.base_url}/{shard}" for shard in shards[self.rank :: self.world]]

    def _samples(self, bucket: str, counts: list[int]) -> Any:
        import webdataset as wds

        epoch, cfg = self.epoch, self.cfg

        def expand(source: Any) -> Any:
            for sample in source:
                entry = self.index.get(sample["__key__"])
                if entry is None or sample["__key__"] not in self.row_of:
                    continue  # garbage or another plan's latent
                payload = checked(sample["safetensors"], entry, sample["__url__"])
                row, flipped = self.row_of[sample["__key__"]]
                for copy in range(counts[row]):
                    rng = np.random.default_rng([cfg.seed, epoch, row, copy, SAMPLE_STREAM])
                    flip_p = self.plan[row]["flip_p"] if self.plan[row]["flip_p"] is not None else cfg.flip_p
                    # Each copy trains flipped with chance flip_p: it is taken from whichever stream matches.
                    if bool(rng.random() < flip_p) == flipped:
                        yield self.dataset.sample(row, entry, load_tensors(payload), rng)

        pipeline = wds.WebDataset(
            self._shards(bucket), shardshuffle=False, nodesplitter=_this_rank, empty_check=False, seed=cfg.seed + epoch
        )
        return pipeline.compose(expand).shuffle(self.shuffle_buffer, rng=random_module(cfg.seed, epoch, bucket))

    def __iter__(self):
        counts = epoch_counts([row["repeats"] for row in self.plan], self.cfg.seed, self.epoch)
        per_bucket: dict[str, int] = defaultdict(int)
        for row, count in zip(self.plan, counts, strict=True):
            per_bucket[row["bucket"]] += count
        buckets = sorted(bucket for bucket, total in per_bucket.items() if total)
        sources = {bucket: iter(self._samples(bucket, counts)) for bucket in buckets}
        pending: dict[str, list[dict[str, Any]]] = {bucket: [] for bucket in buckets}
        weights = {bucket: float(per_bucket[bucket]) for bucket in buckets}
        rng = np.random.default_rng([self.cfg.seed, self.epoch, ORDER_STREAM])
        self.batch_index = 0
        for batch in self._batches(sources, pending, weights, rng):
            self.batch_index += 1
            yield batch
        self.epoch, self.batch_index = self.epoch + 1, 0

    def _batches(self, sources: dict[str, Any], pending: dict[str, list[dict[str, Any]]], weights: dict[str, float], rng: Any):
        """Draw buckets in proportion to what is left of them; a batch is full, or a bucket's remainder."""
        while weights:
            names = sorted(weights)
            probabilities = np.array([weights[name] for name in names]) / sum(weights.values())
            bucket = names[int(rng.choice(len(names), p=probabilities))]
            sample = next(sources[bucket], None)
            if sample is None:
                del weights[bucket]
                if pending[bucket] and self.cfg.bucket_remainder != "drop":
                    yield collate(pending[bucket], self.cfg.minibatch_repeat)
                continue
            pending[bucket].append(sample)
            if len(pending[bucket]) == self.cfg.batch_size:
                yield collate(pending[bucket], self.cfg.minibatch_repeat)
                pending[bucket] = []


def _this_rank(urls: Any) -> Any:
    """The shard list is already this rank's share (StreamingLatentLoader._shards)."""
    return urls


def random_module(seed: int, epoch: int, bucket: str) -> Any:
    """A seeded `random.Random` for webdataset's shuffle buffer (it takes the stdlib interface)."""
    import random

    return random.Random(f"{seed}:{epoch}:{bucket}")


def make_loader(
    plan: Path | list[dict[str, Any]], store: str | Path, index_path: Path, cfg: TrainParams, rank: int = 0,
    world: int = 1, logs_dir: Path | None = None, exclude: frozenset[str] = frozenset(),
) -> LatentLoader | StreamingLatentLoader:
    """Random access for a local store; webdataset streaming for shard URLs (s3://, https://, pipe:)."""
    if is_remote(store):
        return StreamingLatentLoader(plan, index_path, str(store), cfg, rank, world, exclude=exclude)
    return LatentLoader(plan, Path(store), cfg, rank, world, logs_dir, exclude=exclude)
