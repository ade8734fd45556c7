"""Running a model over every image: finding the model, fingerprinting it, decoding in a pool, batching.

Shared by the caption and tag stages. Model outputs are cached per (image_id, model identity, params)
in a Parquet table that DVC keeps between runs (`persist`), so a rerun only runs new images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps
from tqdm import tqdm

from pipeline.errors import KilnError
from pipeline.presets import PRESETS, SD_PRESETS, cache_root, preset_dir, presets_for
from pipeline.tables import DamagedTable, atomic_write, read_table, write_table

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")
Output = TypeVar("Output")

# Files that make up a model's identity; README, images and the like do not change its outputs.
IDENTITY_SUFFIXES = {".safetensors", ".bin", ".onnx", ".json", ".txt", ".csv", ".model", ".pt", ".ckpt", ".msgpack"}


def read_model_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The model outputs cached so far by key; a damaged cache file is only lost work, so it is started
    again (with a warning naming it) rather than stopping the stage."""
    if not path.is_file():
        return {}
    try:
        return {row["cache_key"]: row for row in read_table(path)}
    except DamagedTable as exc:
        log.warning("%s; its model outputs will be computed again", str(exc).rsplit("; rerun", 1)[0])
        return {}


def load_rgb(path: Path) -> Image.Image:
    """Decode an image as a model sees it: first frame, EXIF orientation applied, alpha on white, RGB."""
    return load_rgb_and_alpha(path)[0]


def load_rgb_and_alpha(path: Path) -> tuple[Image.Image, Image.Image | None]:
    """The RGB image (alpha composited on white) and its alpha channel ("L") when it has one."""
    alpha = None
    with Image.open(path) as image:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit greyscale: scale to 8 bits instead of letting convert() clip everything above 255.
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "P") and (image.mode != "P" or "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        image = background
    return image.convert("RGB"), alpha


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder on disk and the short name that goes into `source` columns."""

    folder: Path
    name: str


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def accepted_models(key: str) -> str:
    """What `key` may name, as its error messages say it: only a Stable Diffusion key takes a single
    checkpoint file, and only the presets that fit the key are listed."""
    presets = presets_for(key)
    if presets == SD_PRESETS:
        return f"a diffusers model folder, a single .safetensors/.ckpt file, a hub id (org/name) or a preset ({', '.join(presets)})"
    return f"a local model folder, a hub id (org/name) or a preset ({', '.join(presets)})"


def resolve_model(spec: str, key: str) -> ResolvedModel:
    """A preset name, a local folder or checkpoint file, or a hub id already cached (or downloadable when online)."""
    if spec in PRESETS:
        return ResolvedModel(preset_dir(spec), spec)
    local = Path(spec).expanduser()
    if local.is_dir():
        return ResolvedModel(local, local.resolve().name)
    if local.is_file() and local.suffix in SINGLE_FILE_SUFFIXES:
        return ResolvedModel(local, local.stem)
    if local.is_file():
        raise KilnError(f"{key}: '{spec}' is a file Kiln cannot load as a model. Point {key} at {accepted_models(key)}.")
    # `org/name`; `models/sd15.safetensors` is a missing file, not a hub id.
    looks_like_hub_id = (
        spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and local.suffix not in SINGLE_FILE_SUFFIXES
    )
    if not looks_like_hub_id:
        raise KilnError(f"{key}: '{spec}' not found. Point {key} at {accepted_models(key)}.")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id=spec, local_files_only=True)
    except Exception:
        try:
            folder = snapshot_download(repo_id=spec)
        except Exception as exc:
            name = spec.split("/")[1]
            raise KilnError(
                f"{key}: '{spec}' not found: no such local folder, not in the local hub cache, and it could not be "
                f"downloaded ({exc.__class__.__name__}). To work offline, download it where there is network "
                f"(`hf download {spec} --local-dir /models/{name}`), copy the folder here, and set {key}: /models/{name}"
            ) from None
    return ResolvedModel(Path(folder), spec.split("/")[1])


# Fingerprints already computed, keyed by the files' (path, size, mtime_ns): hashing an SDXL checkpoint
# takes seconds at every start of `kiln cache`. The same trust as make's, and scan's probe cache: a file
# rewritten with the same size and modification time is taken as unchanged.
FINGERPRINTS_KEPT = 256


def fingerprint(folder: Path) -> str:
    """sha256 over the model's weight, config and vocabulary files (names and bytes), or of one file;
    remembered in <cache root>/fingerprints.json by the files' size and modification time."""
    if folder.is_file():
        files = [folder]
    else:
        files = sorted(
            path for path in folder.rglob("*")
            if path.is_file() and path.suffix in IDENTITY_SUFFIXES and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        )
    if not files:
        raise KilnError(f"{folder}: no model files (config, weights) in this folder")
    stats = [(path.resolve().as_posix(), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    key = cache_key(fingerprint=str(folder.resolve()), single_file=folder.is_file(), files=stats)
    record_path = cache_root() / "fingerprints.json"
    record = _read_fingerprints(record_path)
    if key in record:
        return record[key]
    value = _hash_files(folder, files)
    record[key] = value
    kept = dict(list(record.items())[-FINGERPRINTS_KEPT:])
    try:
        atomic_write(record_path, lambda tmp: tmp.write_text(json.dumps(kept, indent=0), encoding="utf-8"))
    except (KilnError, OSError):
        pass  # a read-only cache costs the hashing next time, nothing else
    return value


def _read_fingerprints(path: Path) -> dict[str, str]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or damaged: computed again
    return record if isinstance(record, dict) and all(isinstance(v, str) for v in record.values()) else {}


def _hash_files(folder: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        if path != folder:  # a folder's files are named in the digest; a single file's name is not
            digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_key(**fields: Any) -> str:
    """A stable hash of everything that determines a model output."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def resolve_device(device: str, dtype: str) -> tuple[str, Any]:
    """`auto` -> CUDA when available; dtype `auto` -> float16 on CUDA, float32 elsewhere."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KilnError(f"device '{device}' asked for, but torch sees no CUDA device; use device: cpu or auto")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def dtype_argument(dtype: Any) -> dict[str, Any]:
    """from_pretrained's precision keyword: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@dataclass
class Outcome(Generic[Item, Output]):
    item: Item
    output: Output | None
    error: str | None = None


def chunks(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def run_batched(
    batches: list[list[Item]],
    load: Callable[[Item], Loaded],
    infer: Callable[[list[Loaded]], list[Output]],
    workers: int,
    label: Callable[[Item], str],
    desc: str,
) -> Iterator[Outcome[Item, Output]]:
    """Decode items in a thread pool two batches ahead of the model, and run the model batch by batch.

    A batch whose model call fails is retried one image at a time, so one bad image costs only itself;
    its error names the image.
    """
    workers = workers or os.cpu_count() or 1
    total = sum(len(batch) for batch in batches)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=total, desc=desc, unit="img", disable=None) as progress:
        def submit(batch: list[Item]) -> list[Future[Loaded]]:
            return [pool.submit(load, item) for item in batch]

        pending: deque[list[Future[Loaded]]] = deque(submit(batch) for batch in batches[:2])
        for index, batch in enumerate(batches):
            futures = pending.popleft()
            if index + 2 < len(batches):
                pending.append(submit(batches[index + 2]))
            ready: list[tuple[Item, Loaded]] = []
            for item, future in zip(batch, futures, strict=True):
                try:
                    ready.append((item, future.result()))
                except Exception as exc:
                    message = f"{label(item)}: cannot read image ({exc.__class__.__name__}: {exc})"
                    log.error(message)
                    yield Outcome(item, None, message)
            yield from _infer_batch(ready, infer, label)
            progress.update(len(batch))


def _infer_batch(
    ready: list[tuple[Any, Any]], infer: Callable[[list[Any]], list[Any]], label: Callable[[Any], str]
) -> Iterator[Outcome[Any, Any]]:
    if not ready:
        return
    try:
        outputs = infer([loaded for _, loaded in ready])
    except Exception as exc:
        if len(ready) == 1:
            message = f"{label(ready[0][0])}: model failed ({exc.__class__.__name__}: {exc})"
            log.error(message)
            yield Outcome(ready[0][0], None, message)
            return
        log.warning("a batch of %d failed (%s: %s); retrying image by image", len(ready), exc.__class__.__name__, exc)
        for pair in ready:
            yield from _infer_batch([pair], infer, label)
        return
    for (item, _), output in zip(ready, outputs, strict=True):
        yield Outcome(item, output)


@dataclass(frozen=True)
class ModelStagePaths:
    """A model stage reads a scan table (images or files.parquet) and the image files; its cache is in out_dir."""

    images: Path
    data_root: Path
    out_dir: Path

    @property
    def cache(self) -> Path:
        return self.out_dir / "model_cache.parquet"


@dataclass
class CachedRun:
    """Model outputs by cache key (old and new), and what this run did."""

    cache: dict[str, dict[str, Any]]
    ran: int = 0
    from_cache: int = 0
    failures: list[str] = field(default_factory=list)


def run_cached(
    rows: list[dict[str, Any]],
    keys: dict[str, str],
    cache_path: Path,
    schema: pa.Schema,
    make_model: Callable[[], Any],
    to_cache_row: Callable[[Any], dict[str, Any]],
    data_root: Path,
    batch_size: int,
    workers: int,
    desc: str,
) -> CachedRun:
    """Run the model on the images.parquet rows whose key (by image_id) the cache lacks; update the cache.

    The model is built only when something is missing. The cache is written even when the run is
    interrupted, so no output already computed is lost; failed images are not cached and retry next run.
    """
    cache = read_model_cache(cache_path)
    missing = [row for row in rows if keys[row["image_id"]] not in cache]
    result = CachedRun(cache, from_cache=len(rows) - len(missing))
    if not missing:
        return result
    model = make_model()
    preprocess = getattr(model, "preprocess", lambda image: image)
    outcomes = run_batched(
        chunks(missing, batch_size), lambda row: preprocess(load_rgb(data_root / row["path"])), model,
        workers, label=lambda row: row["path"], desc=desc,
    )
    try:
        for outcome in outcomes:
            if outcome.error:
                result.failures.append(outcome.error)
                continue
            key = keys[outcome.item["image_id"]]
            cache[key] = {"cache_key": key, "image_id": outcome.item["image_id"], **to_cache_row(outcome.output)}
            result.ran += 1
    finally:
        write_table(sorted(cache.values(), key=lambda row: row["cache_key"]), schema, cache_path)
    return result
