"""Stage `cache`: encode each bucketed crop with the VAE once, into the content-addressed latent store.

Per sample the store holds the latent distribution's mean and std (so the trainer can draw a fresh
latent each step, or use the mean), the mask at latent size when there is one, and SDXL's size fields.
A sample's cache_key hashes everything that determines its bytes, so the stage encodes exactly the keys
the store lacks: adding 10 images encodes 10, editing a caption encodes none, changing the resolution
encodes all. Under `accelerate launch`, each rank encodes a disjoint slice and rank 0 indexes the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from pipeline.errors import KilnError
from pipeline.inference import cache_key, chunks, load_rgb_and_alpha, run_batched
from pipeline.latents import LatentStore, Sample, ends_shard
from pipeline.models import LoadedVAE, find_vae
from pipeline.params import CacheParams
from pipeline.tables import DamagedTable, read_table, require, write_table

log = logging.getLogger(__name__)

# Bump when what a sample holds, or how it is computed, changes: every old key then becomes garbage.
CACHE_FORMAT_VERSION = 1
# data/latents/keys.parquet: the keys the current inputs resolve to, for balance to look up.
KEYS_SCHEMA = pa.schema([("image_id", pa.string()), ("flip", pa.bool_()), ("cache_key", pa.string())])
RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "area": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class CachePaths:
    buckets: Path
    files: Path  # data/scan/files.parquet: paths, sizes, masks; no captions
    data_root: Path
    store: Path

    @property
    def keys(self) -> Path:
        return self.store / "keys.parquet"


@dataclass(frozen=True)
class Entry:
    """One latent to have: an image's bucketed crop, maybe flipped."""

    cache_key: str
    image: dict[str, Any]
    geometry: dict[str, Any]
    flip: bool
    mask: str | None  # "file", "alpha" or None

    @property
    def bucket(self) -> str:
        return self.geometry["bucket"]


@dataclass
class Prepared:
    entry: Entry
    pixels: np.ndarray  # (3, H, W) float32 in [-1, 1]
    mask: np.ndarray | None  # (1, H / 8, W / 8) float32 in [0, 1]


@dataclass
class CacheResult:
    encoded: int = 0
    reused: int = 0
    repaired: int = 0
    adopted: int = 0
    garbage: int = 0
    collected: int = 0
    nan_fallbacks: int = 0
    failures: list[str] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "encoded": self.encoded, "reused": self.reused, "repaired": self.repaired, "adopted": self.adopted,
            "garbage": self.garbage, "collected": self.collected, "nan_fallbacks": self.nan_fallbacks,
            "failed": len(self.failures), "buckets": self.buckets,
        }


def plan(
    images: list[dict[str, Any]], buckets: list[dict[str, Any]], cfg: CacheParams, interpolation: str,
    vae_identity: str, vae_dtype: str,
) -> list[Entry]:
    """Every latent the current inputs call for, sorted by (bucket, cache_key)."""
    by_id = {row["image_id"]: row for row in images}
    entries = []
    for geometry in buckets:
        image = by_id.get(geometry["image_id"])
        if image is None:
            raise KilnError(
                f"buckets.parquet lists image {geometry['image_id'][:12]}… that files.parquet lacks; rerun `kiln bucket`"
            )
        mask, mask_identity = None, None
        if cfg.masks and image["mask_path"]:
            mask, mask_identity = "file", image["mask_sha256"]
        elif cfg.masks and image["has_alpha"]:
            mask, mask_identity = "alpha", "alpha"  # the alpha is part of the image bytes, so of image_id
        flips = [False, True] if cfg.flip_latents or (image["flip_p"] or 0) > 0 else [False]
        for flip in flips:
            key = cache_key(
                format=CACHE_FORMAT_VERSION, kind="latent", image_id=image["image_id"], vae=vae_identity,
                bucket=[geometry["bucket_w"], geometry["bucket_h"]], resize=[geometry["resize_w"], geometry["resize_h"]],
                crop=[geometry["crop_left"], geometry["crop_top"]], interpolation=interpolation, flip=flip,
                dtype=cfg.dtype, vae_dtype=vae_dtype, mask=mask_identity,
            )
            entries.append(Entry(key, image, geometry, flip, mask))
    return sorted(entries, key=lambda entry: (entry.bucket, entry.cache_key))


def _crop(image: Image.Image, geometry: dict[str, Any], flip: bool, resample: Image.Resampling) -> Image.Image:
    left, top = geometry["crop_left"], geometry["crop_top"]
    resized = image.resize((geometry["resize_w"], geometry["resize_h"]), resample)
    cropped = resized.crop((left, top, left + geometry["bucket_w"], top + geometry["bucket_h"]))
    return ImageOps.mirror(cropped) if flip else cropped


def _as_scanned(path: Path, sha256: str) -> io.BytesIO:
    """The file's bytes, if they are still those `kiln scan` hashed into image_id (or mask_sha256): the
    cache key names those bytes, so a latent of any others would be stored under a key it does not match.
    Hashing costs a tenth of decoding or less (a 2 MP photo: 1.1 ms against 22 ms as JPEG, 5 ms against 56 ms
    as PNG), and the bytes are read once."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise KilnError(f"{path} changed since `kiln scan`; rerun `kiln scan`")
    return io.BytesIO(data)


def prepare(entry: Entry, data_root: Path, interpolation: str, downsample: int) -> Prepared:
    """Decode, resize to cover the bucket, crop, maybe flip, and scale to [-1, 1]; the mask likewise."""
    rgb, alpha = load_rgb_and_alpha(_as_scanned(data_root / entry.image["path"], entry.image["image_id"]))
    crop = _crop(rgb, entry.geometry, entry.flip, RESAMPLE[interpolation])
    # (H, W, 3) -> (3, H, W), made contiguous: a transposed view would reach the VAE as channels-last.
    pixels = np.ascontiguousarray(np.asarray(crop, dtype=np.float32).transpose(2, 0, 1)) / 127.5 - 1.0
    mask_image = None
    if entry.mask == "file":
        with Image.open(_as_scanned(data_root / entry.image["mask_path"], entry.image["mask_sha256"])) as opened:
            mask_image = ImageOps.exif_transpose(opened).convert("L")
    elif entry.mask == "alpha":
        mask_image = alpha
    mask = None
    if mask_image is not None:
        cropped = _crop(mask_image, entry.geometry, entry.flip, Image.Resampling.BILINEAR)
        # Area interpolation down to the latent grid: each latent cell gets its pixels' mean weight.
        latent_size = (entry.geometry["bucket_w"] // downsample, entry.geometry["bucket_h"] // downsample)
        mask = (np.asarray(cropped.resize(latent_size, Image.Resampling.BOX), dtype=np.float32) / 255.0)[None]
    return Prepared(entry, pixels, mask)


class Encoder:
    """VAE encoding of prepared batches: (mean, std) per sample, with an fp32 retry for half-precision NaNs."""

    def __init__(self, loaded: LoadedVAE, device: Any, vae_dtype: Any, store_dtype: Any, batch_size: int = 1):
        import torch

        self._torch = torch
        self.device, self.vae_dtype, self.store_dtype = torch.device(device), vae_dtype, store_dtype
        self.batch_size = batch_size
        self.vae = loaded.vae.to(self.device)
        if vae_dtype != torch.float32:
            self.vae = self.vae.to(vae_dtype)
        self._fp32_vae: Any = None
        self.nan_fallbacks = 0  # samples re-encoded in float32

    def _encode(self, vae: Any, pixels: Any, dtype: Any) -> tuple[Any, Any]:
        # One batch shape always (self.batch_size): longer batches are cut to it, a short one is padded with
        # zeros, so every sample goes through the same kernels whatever shares its batch, and a latent's
        # bytes depend on its own image alone (an incremental store equals a fresh one).
        torch = self._torch
        means, stds = [], []
        for start in range(0, pixels.shape[0], self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            count = chunk.shape[0]
            if count < self.batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch_size - count, *chunk.shape[1:]))])
            with torch.inference_mode():
                distribution = vae.encode(chunk.to(dtype)).latent_dist
                means.append(distribution.mean[:count].float())
                stds.append(distribution.std[:count].float())
        return torch.cat(means), torch.cat(stds)

    def __call__(self, batch: list[Prepared]) -> list[dict[str, Any]]:
        torch = self._torch
        pixels = torch.from_numpy(np.stack([item.pixels for item in batch]))  # (B, 3, H, W)
        if self.device.type == "cuda":
            # Pinned memory lets the copy overlap with the previous batch's work.
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        mean, std = self._encode(self.vae, pixels, self.vae_dtype)
        broken = ~(torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1))
        if self.vae_dtype != torch.float32 and broken.any():
            # Half-precision VAEs (SDXL's above all) can overflow: those samples alone are redone in fp32
            # (the others keep their bits), and counted.
            self.nan_fallbacks += int(broken.sum())
            if self._fp32_vae is None:
                import copy

                self._fp32_vae = copy.deepcopy(self.vae).to(torch.float32)
            mean, std = mean.clone(), std.clone()  # inference tensors cannot be written in place
            mean[broken], std[broken] = self._encode(self._fp32_vae, pixels[broken], torch.float32)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise FloatingPointError("the VAE returned NaN or inf even in float32")
        mean, std = mean.to(self.store_dtype).cpu(), std.to(self.store_dtype).cpu()
        outputs = []
        for index, item in enumerate(batch):
            tensors = {"mean": mean[index].contiguous(), "std": std[index].contiguous()}
            if item.mask is not None:
                tensors["mask"] = torch.from_numpy(item.mask).to(self.store_dtype)
            outputs.append(tensors)
        return outputs


def encode_batch_shape(cfg: CacheParams, device: Any) -> int:
    """The one batch shape every VAE call uses: cache.batch_size on a GPU, where batching pays; 1 on the
    CPU, where one image at a time is also the fastest (tiny VAE at 512 px: 14 images/s against 8 at 8)."""
    return cfg.batch_size if str(device).startswith("cuda") else 1


def _meta(entry: Entry, tensors: dict[str, Any], store_dtype: str) -> dict[str, Any]:
    geometry, image = entry.geometry, entry.image
    # SDXL's time ids: original (h, w), the crop's top-left in the resized image, and the target (h, w).
    # A flipped crop's left edge is measured from the mirrored side, as kohya computes it.
    left = geometry["crop_left"]
    if entry.flip:
        left = geometry["resize_w"] - left - geometry["bucket_w"]
    return {
        "kind": "latent", "image_id": image["image_id"], "flip": entry.flip, "bucket": entry.bucket,
        "shape": list(tensors["mean"].shape), "dtype": store_dtype, "has_mask": "mask" in tensors,
        "original_size": [image["height"], image["width"]],
        "crop_top_left": [geometry["crop_top"], left],
        "target_size": [geometry["bucket_h"], geometry["bucket_w"]],
    }


class ShardBuffer:
    """Collects encoded samples per bucket (in key order) and writes a shard where layout() cuts: a fresh
    build writes its final shards directly, and settle() then has nothing to rewrite."""

    def __init__(self, store: LatentStore, max_count: int, max_bytes: int):
        self.store, self.max_count, self.max_bytes = store, max_count, max_bytes
        self.group: str | None = None
        self.samples: list[Sample] = []
        self.payload_bytes = 0
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, group: str, sample: Sample) -> None:
        size = len(sample.payload())
        if self.samples and (group != self.group or self.payload_bytes + size > self.max_bytes):
            self.flush()
        self.group = group
        sample.raw = sample.payload()
        self.samples.append(sample)
        self.payload_bytes += size
        if len(self.samples) >= self.max_count or ends_shard(sample.cache_key, self.max_count):
            self.flush()

    def flush(self) -> None:
        if self.samples:
            self.rows.update(self.store.write_shard(self.group or "", self.samples))
        self.samples, self.payload_bytes = [], 0


def encode_entries(
    entries: list[Entry], encoder: Any, store: LatentStore, cfg: CacheParams, data_root: Path,
    interpolation: str, downsample: int, result: CacheResult,
) -> dict[str, dict[str, Any]]:
    """Encode entries (sorted by bucket) in single-bucket batches, writing shards as they fill."""
    by_bucket: dict[str, list[Entry]] = {}
    for entry in entries:
        by_bucket.setdefault(entry.bucket, []).append(entry)
    batches = [batch for bucket in sorted(by_bucket) for batch in chunks(by_bucket[bucket], cfg.batch_size)]
    buffer = ShardBuffer(store, cfg.shard_max_count, cfg.shard_max_bytes)
    outcomes = run_batched(
        batches, lambda entry: prepare(entry, data_root, interpolation, downsample), encoder, cfg.workers,
        label=lambda entry: entry.image["path"] + (" (flipped)" if entry.flip else ""), desc="cache",
    )
    for outcome in outcomes:
        if outcome.error:
            result.failures.append(outcome.error)
            continue
        entry = outcome.item
        buffer.add(entry.bucket, Sample(entry.cache_key, outcome.output, _meta(entry, outcome.output, cfg.dtype)))
    buffer.flush()
    return buffer.rows


def _encode_dtypes(cfg: CacheParams, device: Any) -> tuple[Any, Any]:
    import torch

    vae_dtype = cfg.vae_dtype
    if vae_dtype == "auto":
        vae_dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return getattr(torch, vae_dtype), getattr(torch, cfg.dtype)


def _device(cfg: CacheParams, state: Any) -> Any:
    if cfg.device == "auto":
        return state.device  # under accelerate launch: this rank's GPU, else CUDA when available, else CPU
    from pipeline.inference import resolve_device

    return resolve_device(cfg.device, "float32")[0]


def run(
    cfg: CacheParams, base: str, interpolation: str, paths: CachePaths, gc: bool = False, base_config: str | None = None,
) -> CacheResult:
    """Bring the latent store up to date with buckets.parquet: verify, adopt, encode what is missing."""
    from accelerate import PartialState

    state = PartialState()
    require(paths.files, "scan")
    require(paths.buckets, "bucket")
    images, buckets = read_table(paths.files, "scan"), read_table(paths.buckets, "bucket")
    # Keys need only the VAE's fingerprint; its weights are loaded only when something must be encoded.
    source = find_vae(cfg.vae or base, "cache.vae" if cfg.vae else "model.base", base_config)
    device = _device(cfg, state)
    vae_dtype, store_dtype = _encode_dtypes(cfg, device)
    entries = plan(images, buckets, cfg, interpolation, source.fingerprint, str(vae_dtype))
    wanted = {entry.cache_key for entry in entries}
    store = LatentStore(paths.store)
    result = CacheResult(buckets=dict(sorted(Counter(entry.bucket for entry in entries).items())))

    lock = store.lock(cfg.lock_timeout) if state.is_main_process else contextlib.nullcontext()
    with lock:
        if state.is_main_process:
            try:
                indexed = store.load_index()
            except DamagedTable as exc:
                # The shards hold every sample's index fields: adopting them rebuilds the index, re-encoding nothing.
                log.warning("%s: unreadable (%s); rebuilding it from the shards", store.index_path, exc.__cause__)
                indexed = {}
            verification = store.verify(indexed)
            result.repaired = verification.repaired
            result.adopted = store.adopt_orphans(verification.rows)
            store.write_index(verification.rows)
        state.wait_for_everyone()
        before = store.load_index()
        missing = [entry for entry in entries if entry.cache_key not in before]
        mine = missing[state.process_index :: state.num_processes]
        written: dict[str, dict[str, Any]] = {}
        if mine:
            loaded = source.load()
            encoder = Encoder(loaded, device, vae_dtype, store_dtype, encode_batch_shape(cfg, device))
            written = encode_entries(mine, encoder, store, cfg, paths.data_root, interpolation, loaded.downsample, result)
            result.nan_fallbacks = encoder.nan_fallbacks
        state.wait_for_everyone()
        if not state.is_main_process:
            return result
        rows = {**before, **written}
        store.adopt_orphans(rows)  # the other ranks' shards
        result.encoded = len(set(rows) - set(before))
        result.reused = len(wanted & set(before))
        result.garbage = len(set(rows) - wanted)
        if gc:
            rows = {key: row for key, row in rows.items() if key in wanted}
            result.collected, result.garbage = result.garbage, 0
        # New samples join the shards a fresh build would put them in: the store's bytes depend on its keys.
        store.settle(rows, cfg.shard_max_count, cfg.shard_max_bytes)
        keys = sorted(({"image_id": e.image["image_id"], "flip": e.flip, "cache_key": e.cache_key} for e in entries),
                      key=lambda row: (row["image_id"], row["flip"]))
        write_table(keys, KEYS_SCHEMA, paths.keys)
        store.write_summary(result.summary())
    return result
