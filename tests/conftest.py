"""Shared fixtures and helpers: small generated images, the demo dataset in a temporary data root, a cached
demo project, and the settings the trainer tests use."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.balance import BalancePaths
from pipeline.balance import run as run_balance
from pipeline.bucket import BucketPaths
from pipeline.bucket import run as run_bucket
from pipeline.cache import CachePaths
from pipeline.cache import run as run_cache
from pipeline.demo_data import write_demo_data
from pipeline.latents import LatentStore
from pipeline.params import (
    BalanceParams,
    BucketParams,
    CacheParams,
    Params,
    ScanParams,
    TrainParams,
    validate_params,
)
from pipeline.scan import ScanPaths
from pipeline.scan import run as run_scan
from pipeline.train import TrainPaths


def pytest_configure(config: pytest.Config) -> None:
    # Tests never touch the network or the user's ~/.cache: presets are built into a per-run folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("KILN_CACHE", tempfile.mkdtemp(prefix="kiln-test-cache-"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `slow` and `gpu` tests are opt-in: `pytest -m slow`, or KILN_SLOW=1 for the whole suite.
    markexpr = config.getoption("-m") or ""
    run_slow = os.environ.get("KILN_SLOW") == "1" or "slow" in markexpr
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with -m slow or KILN_SLOW=1"))
        if "gpu" in item.keywords:
            import torch

            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def image_bytes(size: tuple[int, int] = (320, 320), mode: str = "RGB", colour: object = 128, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def write_image(path: Path, size: tuple[int, int] = (320, 320), mode: str = "RGB", colour: object = 128, fmt: str = "PNG", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(size, mode, colour, fmt, **save))
    return path


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "raw"
    write_demo_data(root)
    return root


@pytest.fixture
def demo_root(demo_source: Path, tmp_path: Path) -> Path:
    """A private copy of the demo dataset (data/raw) that a test may edit."""
    root = tmp_path / "data" / "raw"
    shutil.copytree(demo_source, root)
    return root


@pytest.fixture(scope="session")
def scanned_demo(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> Path:
    """images.parquet of the demo dataset (read-only for tests)."""
    from pipeline.params import ScanParams
    from pipeline.scan import ScanPaths, run

    out = tmp_path_factory.mktemp("scan")
    run(ScanParams(workers=1), ScanPaths(demo_source, out))
    return out / "images.parquet"


# --- a project on disk: demo data scanned, bucketed and cached (shared by cache, balance, loader, train tests) ---
BUCKETS = BucketParams(resolution=256, min_bucket_reso=128, max_bucket_reso=512)
FAST = CacheParams(shard_max_count=8, workers=2)  # shards of 1 to 8 samples: the layout's cuts act


class Project:
    def __init__(self, root: Path):
        self.root = root
        self.raw = root / "raw"
        self.scan_paths = ScanPaths(self.raw, root / "scan")
        self.bucket_paths = BucketPaths(self.scan_paths.files, root / "bucket")
        self.paths = CachePaths(self.bucket_paths.buckets, self.scan_paths.files, self.raw, root / "latents")

    def prepare(self, buckets: BucketParams = BUCKETS) -> Project:
        run_scan(ScanParams(workers=1), self.scan_paths)
        run_bucket(buckets, self.bucket_paths)
        return self

    def cache(self, cfg: CacheParams = FAST, base: str = "tiny-sd15", gc: bool = False):
        return run_cache(cfg, base, "lanczos", self.paths, gc=gc)

    @property
    def store(self) -> LatentStore:
        return LatentStore(self.paths.store)

    def index(self) -> dict:
        return self.store.load_index()


def paths_of(project: Project, out: Path) -> BalancePaths:
    """The balance stage's inputs from a prepared and cached project; the plan goes to out/."""
    return BalancePaths(
        project.scan_paths.images, project.bucket_paths.buckets, project.paths.keys,
        project.paths.store / "manifest.parquet", None, None, out,
    )


# --- training on the demo set at resolution 256 with the tiny presets, on the CPU ---------------------
def prepared(root: Path, demo_source: Path, base: str) -> tuple[Project, Path]:
    """A cached demo project and its plan.parquet."""
    shutil.copytree(demo_source, root / "raw")
    project = Project(root).prepare()
    project.cache(base=base)
    run_balance(BalanceParams(), TrainParams(), paths_of(project, root / "plan"))
    return project, root / "plan" / "plan.parquet"


@pytest.fixture(scope="session")
def sd15(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, Path]:
    """The demo set cached with tiny-sd15, and its plan (read-only for tests)."""
    return prepared(tmp_path_factory.mktemp("train15"), demo_source, "tiny-sd15")


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one state per process (its mixed precision among it): a test that trains with
    another mixed precision starts from a fresh one, and leaves one behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def params_for(base: str, **train: object) -> Params:
    settings = {"batch_size": 2, "workers": 0, "max_train_steps": 4, "network_dim": 4, "network_alpha": 2.0, **train}
    return validate_params(
        {"model": {"base": base}, "bucket": {"resolution": 256, "min_bucket_reso": 128, "max_bucket_reso": 512}, "train": settings}
    )


def with_model(settings: Params, **model: object) -> Params:
    return settings.model_copy(update={"model": settings.model.model_copy(update=model)})


def train_paths(project: Project, plan: Path, models: Path) -> TrainPaths:
    return TrainPaths(plan, project.paths.store, project.paths.store / "index.parquet", models)


def unet_output(pipeline: object) -> torch.Tensor:
    """The pipeline's UNet output for fixed latents, timestep and prompt (compares LoRA loads)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    tokens = pipeline.tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipeline.text_encoder(tokens)[0]
        return pipeline.unet(latents, torch.tensor([500]), encoder_hidden_states=states).sample


@contextlib.contextmanager
def sigterm_during_step(step: int) -> Iterator[None]:
    """Within the block, the trainer receives SIGTERM while it runs optimizer step `step` (1-based)."""
    import pipeline.train as train

    real_micro_step = train.micro_step

    def terminated(t, batch, global_step):
        if global_step == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_micro_step(t, batch, global_step)

    train.micro_step = terminated
    try:
        yield
    finally:
        train.micro_step = real_micro_step
