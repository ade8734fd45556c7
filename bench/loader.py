"""Benchmark the latent loader: latents/s for 64x64x4 fp16 latents (SD1.5 at 512) with 0, 1 and 2
DataLoader workers, page cache warm, against the rate an H200 trainer consumes them.

    python bench/loader.py
    python bench/loader.py --latents 8000 --batch-size 16

Target: >= 3000 latents/s on 2 cores, so the GPU (about 150 images/s for SD1.5) never waits on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.balance import PLAN_SCHEMA  # noqa: E402
from pipeline.latents import LatentStore, Sample, layout  # noqa: E402
from pipeline.loader import LatentLoader  # noqa: E402
from pipeline.params import TrainParams  # noqa: E402
from pipeline.tables import write_table  # noqa: E402

TRAINER_RATE = 150.0  # SD1.5 LoRA/full fine-tune images/s on an H200 (shared/NOTES.md speed anchors)


def build_store(root: Path, count: int) -> Path:
    """A store of `count` random 4x64x64 fp16 mean/std samples in one bucket, and its plan."""
    store = LatentStore(root / "latents")
    generator = torch.Generator().manual_seed(0)
    samples, rows = [], {}
    for index in range(count):
        key = f"{index:064x}"
        tensors = {name: torch.randn(4, 64, 64, generator=generator).half() for name in ("mean", "std")}
        meta = {
            "kind": "latent", "image_id": key, "flip": False, "bucket": "512x512", "shape": [4, 64, 64],
            "dtype": "float16", "has_mask": False, "original_size": [512, 512], "crop_top_left": [0, 0],
            "target_size": [512, 512],
        }
        samples.append(Sample(key, tensors, meta))
    for start, stop in layout([sample.cache_key for sample in samples], [1] * count, 1000, 1 << 40):
        rows.update(store.write_shard("512x512", samples[start:stop]))
    store.write_index(rows)
    plan = [
        {
            "image_id": key, "path": f"{key}.png", "subset": "train/1_x", "is_reg": False, "cache_key": key,
            "flip_cache_key": None, "bucket": "512x512", "caption": "a photo, of, a thing", "tags": [],
            "class_tokens": "thing", "repeats": 1.0, "loss_weight": 1.0, "batch_id": None, "flip_p": None,
            "cond_dropout": None, "shuffle_tags": None, "loss_scale": 1.0,
        }
        for key in sorted(rows)
    ]
    write_table(plan, PLAN_SCHEMA, root / "plan.parquet")
    for path in store.shard_files():  # warm the page cache
        path.read_bytes()
    return root / "plan.parquet"


def rate(plan: Path, store: Path, workers: int, batch_size: int) -> float:
    loader = LatentLoader(plan, store, TrainParams(batch_size=batch_size, workers=workers, shuffle_tags=True), pin_memory=False)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["image_ids"])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-loader-") as tmp:
        plan = build_store(Path(tmp), args.latents)
        for workers in (0, 1, 2):
            figure = rate(plan, Path(tmp) / "latents", workers, args.batch_size)
            print(
                f"{workers} workers: {figure:8.0f} latents/s = {figure / TRAINER_RATE:5.1f}x an H200 trainer's "
                f"{TRAINER_RATE:.0f} images/s   (target >= 3000 latents/s)"
            )


if __name__ == "__main__":
    main()
