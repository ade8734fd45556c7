"""Stage `bucket`: aspect-ratio bucketing with kohya's bucket set, so users get the buckets they know.

Each image goes to the bucket of nearest aspect ratio, is resized to cover it and has the overflow
cropped. The output holds geometry only, never captions: editing a caption leaves buckets.parquet
byte-identical, so the latent cache downstream does not rerun.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.params import BucketParams
from pipeline.tables import read_table, require, write_json, write_table

log = logging.getLogger(__name__)

BUCKETS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("bucket", pa.string()),
        ("bucket_w", pa.int32()),
        ("bucket_h", pa.int32()),
        ("resize_w", pa.int32()),
        ("resize_h", pa.int32()),
        ("crop_left", pa.int32()),
        ("crop_top", pa.int32()),
        ("aspect_error", pa.float64()),
    ]
)


@dataclass(frozen=True)
class BucketPaths:
    files: Path  # data/scan/files.parquet: each image's geometry and path (no captions)
    out_dir: Path

    @property
    def buckets(self) -> Path:
        return self.out_dir / "buckets.parquet"

    @property
    def counts(self) -> Path:
        return self.out_dir / "buckets.json"


@dataclass(frozen=True)
class Geometry:
    bucket_w: int
    bucket_h: int
    resize_w: int
    resize_h: int
    crop_left: int
    crop_top: int
    aspect_error: float

    @property
    def bucket(self) -> str:
        return bucket_name(self.bucket_w, self.bucket_h)


@dataclass
class BucketResult:
    rows: list[dict[str, Any]]
    counts: list[dict[str, Any]]
    over_error: list[str]


def bucket_name(width: int, height: int) -> str:
    return f"{width}x{height}"


def make_buckets(
    resolution: tuple[int, int], min_reso: int, max_reso: int, step: int
) -> list[tuple[int, int]]:
    """kohya's bucket set: every (w, h) of about the resolution's area with sides in [min, max].

    The square bucket has side sqrt(area) floored to the step; then for each width w from min to max
    in steps, h = min(max, floor(area / w / step) * step), and (w, h) and (h, w) are added when h >= min.
    """
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area)) // step * step
    buckets = {(side, side)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, area // width // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def _cover(width: int, height: int, bucket_w: int, bucket_h: int) -> tuple[int, int]:
    """The smallest resize of (width, height), aspect kept, that covers the bucket on both sides."""
    scale = max(bucket_w / width, bucket_h / height)
    return max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))


def _crop_offsets(resize: tuple[int, int], bucket: tuple[int, int], image_id: str, cfg: BucketParams) -> tuple[int, int]:
    spare_w, spare_h = resize[0] - bucket[0], resize[1] - bucket[1]
    if not cfg.random_crop:
        return spare_w // 2, spare_h // 2
    # Seeded by (seed, image_id), not by position: the crop of an image never depends on its neighbours,
    # so adding images leaves every existing latent's cache key valid.
    digest = hashlib.sha256(f"{cfg.seed}:{image_id}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return rng.randint(0, spare_w), rng.randint(0, spare_h)


def assign(width: int, height: int, image_id: str, buckets: list[tuple[int, int]], cfg: BucketParams) -> Geometry:
    """Choose an image's bucket, its resize and its crop."""
    aspect = width / height
    if cfg.bucket_no_upscale:
        # kohya's no_upscale: scale down (never up) to at most the area, then floor each side to the step.
        area = cfg.resolution[0] * cfg.resolution[1]
        scale = min(1.0, math.sqrt(area / (width * height)))
        step = cfg.bucket_reso_steps
        bucket = (
            max(step, int(width * scale) // step * step),
            max(step, int(height * scale) // step * step),
        )
    else:
        # Nearest aspect ratio; ties go to the first (smallest) bucket, so the choice is stable.
        bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))
    resize = _cover(width, height, *bucket)
    crop_left, crop_top = _crop_offsets(resize, bucket, image_id, cfg)
    aspect_error = abs(bucket[0] / bucket[1] - aspect) / aspect
    return Geometry(bucket[0], bucket[1], resize[0], resize[1], crop_left, crop_top, aspect_error)


def bucket_images(images: list[dict[str, Any]], cfg: BucketParams) -> BucketResult:
    """Assign every image (image_id, path, width, height); rows sorted by image_id so the bytes never depend on order."""
    buckets = make_buckets(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
    rows = []
    over_error = []
    for image in sorted(images, key=lambda row: row["image_id"]):
        geometry = assign(image["width"], image["height"], image["image_id"], buckets, cfg)
        rows.append({"image_id": image["image_id"], "bucket": geometry.bucket, **geometry.__dict__})
        if geometry.aspect_error > cfg.max_aspect_error:
            over_error.append(
                f"{image['path']}: {image['width']}x{image['height']} in bucket {geometry.bucket} "
                f"(aspect error {geometry.aspect_error:.0%} > bucket.max_aspect_error={cfg.max_aspect_error:.0%})"
            )
    counts: dict[tuple[int, int], int] = {}
    for row in rows:
        key = (row["bucket_w"], row["bucket_h"])
        counts[key] = counts.get(key, 0) + 1
    count_rows = [
        {"bucket": bucket_name(w, h), "bucket_w": w, "bucket_h": h, "aspect": round(w / h, 4), "count": n}
        for (w, h), n in sorted(counts.items(), key=lambda item: item[0][0] / item[0][1])
    ]
    return BucketResult(rows, count_rows, over_error)


def run(cfg: BucketParams, paths: BucketPaths) -> BucketResult:
    """Read files.parquet and write buckets.parquet and buckets.json (per-bucket counts, a DVC plot).

    The geometry table, not images.parquet: a caption edit changes images.parquet, never a bucket."""
    require(paths.files, "scan")
    images = read_table(paths.files, "scan")
    result = bucket_images(images, cfg)
    for message in result.over_error:
        log.warning(message)
    write_table(result.rows, BUCKETS_SCHEMA, paths.buckets)
    write_json({"buckets": result.counts}, paths.counts)
    return result
