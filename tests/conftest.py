"""Shared fixtures: small generated images and the demo dataset in a temporary data root."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.demo_data import write_demo_data


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
