"""Benchmark `kiln scan`: the process pool against one process, and a re-scan after adding 1% of files.

Both baselines run in this same process on the same files, so the figures are ratios that hold on a
noisy machine:

    python bench/scan.py                 # 400 images
    python bench/scan.py --images 2000

Targets (2 cores): pool >= 1.7x one process; re-scan after adding 1% <= 10% of a full scan.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.params import ScanParams  # noqa: E402
from pipeline.scan import ScanPaths, run  # noqa: E402

SIZES = [(1024, 768), (768, 1024), (1216, 832), (896, 896), (1536, 640), (640, 1536)]


def make_image(index: int, rng: np.random.Generator) -> tuple[str, bytes]:
    """A photo-like image: smooth colour fields plus grain, so JPEG/PNG decode costs are realistic."""
    width, height = SIZES[index % len(SIZES)]
    coarse = rng.integers(0, 256, size=(height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, size=(height, width, 3), dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    # Mostly JPEG, as real datasets are; every fourth a PNG.
    if index % 4 == 3:
        image.save(buffer, format="PNG", compress_level=1)
        return f"img_{index:05d}.png", buffer.getvalue()
    image.save(buffer, format="JPEG", quality=92)
    return f"img_{index:05d}.jpg", buffer.getvalue()


def write_images(root: Path, start: int, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed + start)
    for index in range(start, start + count):
        folder = root / "train" / ("10_sks subject" if index % 2 else "3_other thing")
        folder.mkdir(parents=True, exist_ok=True)
        name, data = make_image(index, rng)
        (folder / name).write_bytes(data)
        if index % 3 == 0:
            (folder / name).with_suffix(".txt").write_text(f"caption {index}\n")


def timed_scan(root: Path, out: Path, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    result = run(ScanParams(workers=workers), ScanPaths(root, out))
    return time.perf_counter() - start, result.probed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="images in the full scan")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="kiln-bench-scan-") as tmp:
        root = Path(tmp) / "raw"
        print(f"writing {args.images} images ...", flush=True)
        write_images(root, 0, args.images, args.seed)
        for path in root.rglob("*"):  # warm the page cache so neither run pays for the first disk read
            if path.is_file():
                path.read_bytes()

        single_s, single_n = timed_scan(root, Path(tmp) / "single", workers=1)
        pool_s, pool_n = timed_scan(root, Path(tmp) / "pool", workers=0)
        assert single_n == pool_n == args.images

        added = max(1, args.images // 100)
        write_images(root, args.images, added, args.seed)
        rescan_s, rescan_n = timed_scan(root, Path(tmp) / "pool", workers=0)
        assert rescan_n == added, f"re-scan decoded {rescan_n} files, expected {added}"

    print(f"full scan, one process: {args.images / single_s:8.1f} images/s ({single_s:.2f} s)")
    print(f"full scan, pool of {cores}:   {args.images / pool_s:8.1f} images/s ({pool_s:.2f} s)")
    print(f"pool speed-up:           {single_s / pool_s:8.2f}x one process   (target >= 1.7x on 2 cores)")
    print(
        f"re-scan after +{added} files (1%): {rescan_s:.3f} s = {rescan_s / pool_s:.1%} of the full scan"
        f"   (target <= 10%)"
    )


if __name__ == "__main__":
    main()
