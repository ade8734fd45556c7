"""Benchmark `kiln cache`, each figure a ratio measured in this one run.

    python bench/cache.py                       # tiny-sd15 VAE on the CPU, 96 photo-like JPEGs
    python bench/cache.py --vae sd15 --images 512 --batch-size 16    # on a GPU: the real SD1.5 VAE

1. End-to-end stage throughput (decode, resize, crop, encode, shard writes, index) against a bare loop
   that only VAE-encodes pre-decoded tensors with the same VAE and batch size. Target >= 0.85 on a GPU.
2. An incremental run after adding 1% new images, as a fraction of the full run. Target <= 5%.
3. Reading latents back: random access through the index, and sequential through webdataset.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
import yaml  # noqa: E402
from project import seconds_until, torch_import_seconds  # noqa: E402  (bench/project.py)
from safetensors.torch import load as load_tensors  # noqa: E402
from scan import make_image  # noqa: E402  (bench/scan.py: photo-like test images)

from pipeline.bucket import BucketPaths  # noqa: E402
from pipeline.bucket import run as run_bucket  # noqa: E402
from pipeline.cache import CachePaths, plan, prepare  # noqa: E402
from pipeline.cache import run as run_cache  # noqa: E402
from pipeline.latents import LatentStore  # noqa: E402
from pipeline.models import load_vae  # noqa: E402
from pipeline.params import BucketParams, CacheParams, ScanParams  # noqa: E402
from pipeline.scan import ScanPaths  # noqa: E402
from pipeline.scan import run as run_scan  # noqa: E402
from pipeline.tables import read_table  # noqa: E402

SD15_VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)


def write_images(root: Path, start: int, count: int) -> None:
    rng = np.random.default_rng(start)
    folder = root / "train" / "1_photo"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        name, data = make_image(index * 4, rng)  # every index * 4 is a JPEG in bench/scan.py's mix
        (folder / name).write_bytes(data)


def vae_spec(kind: str, root: Path) -> str:
    if kind == "tiny":
        return "tiny-sd15"
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    folder = root / "sd15-vae"
    AutoencoderKL(**SD15_VAE).save_pretrained(folder)  # the real SD1.5 architecture, random weights
    return str(folder)


def bare_rate(spec: str, cfg: CacheParams, files: Path, buckets: Path, raw: Path, device: str) -> float:
    """Images/s of vae.encode alone on pre-decoded, pre-cropped tensors, batched as the stage batches."""
    loaded = load_vae(spec, "bench")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    entries = plan(read_table(files), read_table(buckets), cfg, "lanczos", loaded.fingerprint, str(dtype))
    by_bucket: dict[str, list] = {}
    for entry in entries:
        by_bucket.setdefault(entry.bucket, []).append(torch.from_numpy(prepare(entry, raw, "lanczos", 8).pixels))
    batches = [
        torch.stack(items[i : i + cfg.batch_size]).to(device, dtype)
        for items in by_bucket.values()
        for i in range(0, len(items), cfg.batch_size)
    ]
    vae = loaded.vae.to(device, dtype)
    with torch.inference_mode():
        # Warm-up over every batch shape: the first call per shape pays for kernel selection, and the
        # stage (run after this, in the same process) finds those shapes warm as well.
        for batch in batches:
            vae.encode(batch).latent_dist.mean.sum().item()
        start = time.perf_counter()
        for batch in batches:
            distribution = vae.encode(batch).latent_dist
            distribution.mean.sum().item()  # sync, as the stage must to store the result
        elapsed = time.perf_counter() - start
    return len(entries) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vae", choices=["tiny", "sd15"], default="tiny")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    with tempfile.TemporaryDirectory(prefix="kiln-bench-cache-") as tmp:
        root = Path(tmp)
        raw = root / "raw"
        write_images(raw, 0, args.images)
        scan_paths = ScanPaths(raw, root / "scan")
        bucket_paths = BucketPaths(scan_paths.files, root / "bucket")
        run_scan(ScanParams(), scan_paths)
        run_bucket(BucketParams(resolution=512), bucket_paths)
        spec = vae_spec(args.vae, root)
        cfg = CacheParams(batch_size=args.batch_size, shard_max_count=256)
        paths = CachePaths(bucket_paths.buckets, scan_paths.files, raw, root / "latents")

        # Both sides warm: an untimed stage run from scratch, then bare, stage, bare (the bare figure is
        # the mean of the two, so a drift of this noisy machine during the run cancels out).
        run_cache(cfg, spec, "lanczos", paths)
        shutil.rmtree(paths.store)
        bare_before = bare_rate(spec, cfg, scan_paths.files, bucket_paths.buckets, raw, device)
        start = time.perf_counter()
        full = run_cache(cfg, spec, "lanczos", paths)
        full_s = time.perf_counter() - start
        bare = (bare_before + bare_rate(spec, cfg, scan_paths.files, bucket_paths.buckets, raw, device)) / 2
        assert full.encoded == args.images

        added = max(1, args.images // 100)
        write_images(raw, args.images, added)
        run_scan(ScanParams(), scan_paths)
        run_bucket(BucketParams(resolution=512), bucket_paths)
        start = time.perf_counter()
        incremental = run_cache(cfg, spec, "lanczos", paths)
        incremental_s = time.perf_counter() - start
        assert incremental.encoded == added

        # Start-up: `kiln cache` with nothing left to encode is the command's fixed cost (imports, the VAE's
        # fingerprint, checking the store), next to importing torch alone.
        params_file = root / "params.yaml"
        params_file.write_text(yaml.safe_dump({"model": {"base": spec}, "cache": {"batch_size": args.batch_size, "shard_max_count": 256}}))
        kiln = [str(Path(sys.executable).parent / "kiln"), "cache", "--params", str(params_file)]
        where = ["--buckets", str(bucket_paths.buckets), "--files", str(scan_paths.files), "--data-root", str(raw), "--store", str(paths.store)]
        startup_s = seconds_until(kiln + where, None, root)
        torch_s = torch_import_seconds()

        store = LatentStore(paths.store)
        rows = list(store.load_index().values())
        random.Random(0).shuffle(rows)
        start = time.perf_counter()
        for row in rows:
            store.read(row)
        random_rate = len(rows) / (time.perf_counter() - start)
        urls = [str(path) for path in store.shard_files()]
        start = time.perf_counter()
        count = sum(1 for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False) if load_tensors(sample["safetensors"]))
        sequential_rate = count / (time.perf_counter() - start)
        shutil.rmtree(root / "latents")

    stage = args.images / full_s
    print(f"VAE {args.vae} on {device}, {args.images} images at 512, batch {args.batch_size}")
    print(f"bare vae.encode on pre-decoded tensors: {bare:8.1f} images/s")
    print(f"kiln cache end to end:                  {stage:8.1f} images/s = {stage / bare:.2f} of bare   (target >= 0.85 on GPU)")
    print(f"incremental run after +{added} images (1%):  {incremental_s:.2f} s = {incremental_s / full_s:.1%} of the full run   (target <= 5%)")
    print(f"read back: random access via index {random_rate:9.0f} latents/s; webdataset sequential {sequential_rate:9.0f} latents/s")
    print(f"start-up: `kiln cache` with nothing to encode {startup_s:.2f} s, of which importing torch {torch_s:.2f} s   (target: under 5 s besides torch)")


if __name__ == "__main__":
    main()
