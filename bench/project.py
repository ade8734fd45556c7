"""A benchmark project: the demo images scanned, bucketed into one square bucket, cached and planned.

Shared by bench/train.py and bench/memory.py, so both measure the trainer on the same inputs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.balance import BalancePaths  # noqa: E402
from pipeline.balance import run as run_balance  # noqa: E402
from pipeline.bucket import BucketPaths  # noqa: E402
from pipeline.bucket import run as run_bucket  # noqa: E402
from pipeline.cache import CachePaths  # noqa: E402
from pipeline.cache import run as run_cache  # noqa: E402
from pipeline.demo_data import write_demo_data  # noqa: E402
from pipeline.params import BalanceParams, BucketParams, CacheParams, ScanParams, TrainParams  # noqa: E402
from pipeline.scan import ScanPaths  # noqa: E402
from pipeline.scan import run as run_scan  # noqa: E402
from pipeline.train import TrainPaths  # noqa: E402


@dataclass(frozen=True)
class Project:
    root: Path
    scan: ScanPaths
    bucket: BucketPaths
    cache: CachePaths
    plan: Path

    def train_paths(self, models: Path) -> TrainPaths:
        return TrainPaths(self.plan, self.cache.store, self.cache.store / "index.parquet", models)


def demo_project(root: Path, base: str, side: int) -> Project:
    """The 22 demo images in one side x side bucket, their latents encoded with `base`'s VAE, and the plan."""
    write_demo_data(root / "raw")
    scan = ScanPaths(root / "raw", root / "scan")
    bucket = BucketPaths(scan.files, root / "bucket")
    run_scan(ScanParams(), scan)
    run_bucket(BucketParams(resolution=side, min_bucket_reso=side, max_bucket_reso=side), bucket)
    cache = CachePaths(bucket.buckets, scan.files, root / "raw", root / "latents")
    run_cache(CacheParams(), base, "lanczos", cache)
    balance = BalancePaths(scan.images, bucket.buckets, cache.keys, cache.store / "manifest.parquet", None, None, root / "plan")
    run_balance(BalanceParams(), TrainParams(), balance)
    return Project(root, scan, bucket, cache, balance.plan)


def seconds_until(command: list[str], marker: str | None, cwd: Path) -> float:
    """Wall seconds from starting `command` until a line of its output contains `marker` (then it is
    stopped), or until it exits when `marker` is None. Start-up figures: what a user waits for."""
    import subprocess
    import time

    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if marker is not None and marker in line:
            elapsed = time.perf_counter() - start
            process.kill()
            process.wait()
            return elapsed
    if process.wait() != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {process.returncode})")
    if marker is not None:
        raise RuntimeError(f"{' '.join(command)} never printed {marker!r}")
    return time.perf_counter() - start


def torch_import_seconds() -> float:
    """How long `import torch` takes in a fresh interpreter: the part of a start-up no Kiln change removes."""
    return seconds_until([sys.executable, "-c", "import torch"], None, Path.cwd())
