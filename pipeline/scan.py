"""Stage `scan`: walk data/raw/{train,reg}, decode and hash every image, read captions and metadata.

Folders follow kohya's DreamBooth convention (`<repeats>_<class tokens>`); metadata follows EveryDream2
(`.yaml` sidecars, `local.yaml`, recursive `global.yaml`, `multiply.txt` and friends). Every image is
decoded in full, in a process pool, and keyed by the sha256 of its bytes (`image_id`). A probe cache
keyed by (path, size, mtime_ns) lets a re-scan of an unchanged tree skip the decoding.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.errors import KilnError
from pipeline.images import allow_pixels
from pipeline.params import ScanParams
from pipeline.tables import read_table, write_json, write_table

log = logging.getLogger(__name__)

SUBSETS = ("train", "reg")
# Bump when the probe's fields or their meaning change: old cache rows are then ignored.
PROBE_VERSION = 1
# While decoding, the probe cache is saved this often, so a killed scan loses at most this much work.
CHECKPOINT_SECONDS = 30.0
# Below this many files to decode, a process pool costs more to start than it saves.
MIN_FILES_FOR_POOL = 32
EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

# EveryDream2 per-image fields: yaml key -> (parser, column name).
ED2_FLOAT_FIELDS = ("multiply", "flip_p", "cond_dropout", "loss_scale")
ED2_FOLDER_FILES = {f"{name}.txt": name for name in (*ED2_FLOAT_FIELDS, "batch_id")}

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("file_size", pa.int64()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("notes", pa.list_(pa.string())),
        ("is_reg", pa.bool_()),
        ("subset", pa.string()),
        ("repeats", pa.int32()),
        ("class_tokens", pa.string()),
        ("caption", pa.string()),
        ("caption_source", pa.string()),
        ("yaml_tags", pa.list_(pa.string())),
        ("yaml_tag_weights", pa.list_(pa.float64())),
        ("batch_id", pa.string()),
        ("multiply", pa.float64()),
        ("flip_p", pa.float64()),
        ("cond_dropout", pa.float64()),
        ("loss_scale", pa.float64()),
        ("shuffle_tags", pa.bool_()),
        ("mask_path", pa.string()),
        ("has_alpha", pa.bool_()),
    ]
)

# What the pixel stages (tag, cache) need, and nothing a caption edit changes: those stages depend on
# this table instead of images.parquet, so DVC does not rerun them when only text changed.
FILES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("subset", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("has_alpha", pa.bool_()),
        ("mask_path", pa.string()),
        ("mask_sha256", pa.string()),
        ("flip_p", pa.float64()),
    ]
)

REJECTED_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string()), ("detail", pa.string())])

PROBE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("probe_version", pa.int32()),
        ("image_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("has_alpha", pa.bool_()),
        ("notes", pa.list_(pa.string())),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# Rejections that depend on params or on the moment, not only on the file's bytes: never cached.
UNCACHED_REASONS = {"too_large", "unreadable"}


@dataclass(frozen=True)
class ScanPaths:
    data_root: Path
    out_dir: Path

    @property
    def images(self) -> Path:
        return self.out_dir / "images.parquet"

    @property
    def files(self) -> Path:
        return self.out_dir / "files.parquet"

    @property
    def rejected(self) -> Path:
        return self.out_dir / "rejected.parquet"

    @property
    def summary(self) -> Path:
        return self.out_dir / "summary.json"

    @property
    def probe_cache(self) -> Path:
        return self.out_dir / "probe_cache.parquet"


@dataclass(frozen=True)
class Concept:
    """A kohya concept folder: `train/10_sks circle` trains its images 10 times per epoch."""

    subset: str
    folder: Path
    repeats: int
    class_tokens: str
    is_reg: bool


@dataclass(frozen=True)
class Candidate:
    path: Path
    rel: str
    concept: Concept


@dataclass
class ScanResult:
    images: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    summary: dict[str, Any]
    probed: int = 0
    reused: int = 0
    warnings: list[str] = field(default_factory=list)


class MetadataError(Exception):
    """A caption or metadata file that cannot be used; the image is rejected with this detail."""


def parse_concept_folder(name: str) -> tuple[int, str] | None:
    """`10_sks circle` -> (10, "sks circle"); None when the name has no numeric `<repeats>_` prefix."""
    match = re.fullmatch(r"(\d+)_(.*)", name, flags=re.DOTALL)
    if not match:
        return None
    return int(match.group(1)), match.group(2).strip()


def _warn(result_warnings: list[str], message: str) -> None:
    log.warning(message)
    result_warnings.append(message)


class RootGuard:
    """The one check for every file scan reads (image, mask, caption, metadata): a path that resolves
    outside the data root, through a symlink, is not read; it is recorded in rejected.parquet and warned
    about once. train/ and reg/ may themselves be symlinks to another disk: what lies under them is in."""

    def __init__(self, data_root: Path, rejected: list[dict[str, Any]], result_warnings: list[str]):
        self.data_root = data_root
        self.roots = [data_root.resolve()] + [(data_root / subset).resolve() for subset in SUBSETS]
        self.rejected = rejected
        self.warnings = result_warnings
        self._refused: set[str] = set()

    def allows(self, path: Path) -> bool:
        resolved = path.resolve()
        if any(resolved == root or root in resolved.parents for root in self.roots):
            return True
        # relpath, not _rel: a masks_dir of '../masks' is lexically outside the root too.
        rel = Path(os.path.relpath(path, self.data_root)).as_posix()
        # Two images with one stem (a.png, a.jpg) share a sidecar: record it once.
        if rel not in self._refused:
            self._refused.add(rel)
            target = os.path.realpath(path)
            self.rejected.append({"path": rel, "reason": "symlink_outside_root", "detail": f"points to {target}"})
            _warn(self.warnings, f"{rel}: a symlink to {target}, outside the data root; not read")
        return False


def _is_image(path: Path, cfg: ScanParams) -> bool:
    return path.suffix.lower() in cfg.image_extensions and not path.stem.endswith(cfg.mask_suffix)


def _folder_files(folder: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return sorted(entry for entry in folder.iterdir() if not entry.is_dir())
    files = []
    # followlinks=False: a symlinked sub-folder could loop or leave the data root.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        files += [Path(dirpath) / name for name in filenames]
    return sorted(files)


def layout_hint(data_root: Path) -> str:
    """Where images go: the kohya layout, said the same way for a missing and for an empty data root."""
    return (
        f"Put images in {data_root}/train/<repeats>_<class tokens>/ "
        f"(for example '{data_root}/train/10_sks dog/'), or run `kiln demo-data`."
    )


def discover(
    data_root: Path, cfg: ScanParams, result_warnings: list[str]
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Find every image under train/ and reg/; return candidates and the files of skipped folders."""
    if not any((data_root / subset).is_dir() for subset in SUBSETS):
        raise KilnError(f"{data_root}: no train/ or reg/ folder. {layout_hint(data_root)}")
    candidates: list[Candidate] = []
    skipped: list[dict[str, Any]] = []
    for subset in SUBSETS:
        base = data_root / subset
        if not base.is_dir():
            continue
        loose = [entry for entry in sorted(base.iterdir()) if not entry.is_dir() and _is_image(entry, cfg)]
        if loose:
            if cfg.require_repeats_prefix:
                _warn(
                    result_warnings,
                    f"{subset}/: {len(loose)} image(s) outside any concept folder skipped; move them into "
                    f"{subset}/<repeats>_<class tokens>/",
                )
                skipped += [
                    {"path": _rel(p, data_root), "reason": "no_concept_folder", "detail": "not in a concept folder"}
                    for p in loose
                ]
            else:
                concept = Concept(subset, base, 1, "", subset == "reg")
                candidates += [Candidate(p, _rel(p, data_root), concept) for p in loose]
        for folder in sorted(entry for entry in base.iterdir() if entry.is_dir()):
            files = [p for p in _folder_files(folder, cfg.recursive) if _is_image(p, cfg)]
            parsed = parse_concept_folder(folder.name)
            if parsed is None and cfg.require_repeats_prefix:
                reason = f"folder name has no '<repeats>_' prefix; rename it to '1_{folder.name}' or set scan.require_repeats_prefix: false"
            elif parsed is not None and parsed[0] < 1:
                reason = "folder repeats must be at least 1"
            else:
                reason = ""
            if reason:
                _warn(result_warnings, f"{subset}/{folder.name}: skipped ({len(files)} images): {reason}")
                skipped += [{"path": _rel(p, data_root), "reason": "folder_skipped", "detail": reason} for p in files]
                continue
            repeats, tokens = parsed if parsed is not None else (1, folder.name.strip())
            concept = Concept(f"{subset}/{folder.name}", folder, repeats, tokens, subset == "reg")
            candidates += [Candidate(p, _rel(p, data_root), concept) for p in files]
    return candidates, skipped


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def probe_image(path: str, max_pixels: int) -> dict[str, Any]:
    """Decode one image fully and hash its bytes. Runs in a worker process; returns plain data."""
    probe: dict[str, Any] = {"reason": None, "detail": None}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return {"reason": "unreadable", "detail": f"{exc.__class__.__name__}: {exc.strerror or exc}"}
    if not data:
        return {"reason": "empty", "detail": "file is zero bytes"}
    probe["image_id"] = hashlib.sha256(data).hexdigest()
    # Our own limit replaces Pillow's global one, so that a raised scan.max_pixels is honoured.
    allow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return {"reason": "too_large", "detail": f"{width}x{height} is over scan.max_pixels={max_pixels}"}
                notes = []
                if getattr(image, "n_frames", 1) > 1:
                    notes.append("animated")
                    image.seek(0)
                orientation = image.getexif().get(EXIF_ORIENTATION, 1)
                if orientation in (5, 6, 7, 8):
                    width, height = height, width
                if orientation != 1:
                    notes.append("exif_rotated")
                mode = image.mode
                image.load()  # the full decode: truncated and corrupt files fail here, not in training
                has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    except Image.DecompressionBombError as exc:
        return {"reason": "too_large", "detail": str(exc)}
    except UnidentifiedImageError:
        return {"reason": "not_image", "detail": "Pillow cannot identify this file as an image"}
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return {"reason": "corrupt", "detail": f"{exc.__class__.__name__}: {exc}"}
    if mode == "CMYK":
        notes.append("cmyk")
    if mode == "P" and has_alpha:
        notes.append("palette_transparency")
    if mode in ("LA", "La"):
        notes.append("la")
    if mode in SIXTEEN_BIT_MODES:
        notes.append("16bit")
    probe.update(
        width=width, height=height, format=image.format, mode=mode, has_alpha=has_alpha, notes=sorted(notes)
    )
    return probe


def _iter_probes(paths: list[str], cfg: ScanParams) -> Iterator[dict[str, Any]]:
    """Probe each path, in order, in a process pool over all cores (or in this process)."""
    workers = cfg.workers or os.cpu_count() or 1
    with tqdm(total=len(paths), desc="scan: decoding", unit="img", disable=None) as progress:
        if workers == 1 or len(paths) < MIN_FILES_FOR_POOL:
            for path in paths:
                yield probe_image(path, cfg.max_pixels)
                progress.update()
            return
        # Small chunks keep the progress bar live; large ones amortise the inter-process traffic.
        chunksize = max(1, min(16, len(paths) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for probe in pool.map(probe_image, paths, [cfg.max_pixels] * len(paths), chunksize=chunksize):
                yield probe
                progress.update()


def _load_probe_cache(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        rows = read_table(path)
    except Exception as exc:  # a damaged cache only costs time: rebuild it
        log.warning("%s: unreadable probe cache, decoding every image again (%s)", path, exc)
        return {}
    return {row["path"]: row for row in rows if row.get("probe_version") == PROBE_VERSION}


def read_text(path: Path, result_warnings: list[str], data_root: Path) -> str:
    """Read a caption or metadata file: UTF-8 (a BOM is stripped), else cp1252/latin-1 with a warning."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    for encoding in ("cp1252", "latin-1"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        _warn(result_warnings, f"{_rel(path, data_root)}: not UTF-8, read as {encoding}; save it as UTF-8")
        return text.lstrip("\ufeff")
    raise AssertionError("latin-1 decodes any bytes")


def _first_line(text: str) -> str:
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


def _float_field(name: str, value: Any, source: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetadataError(f"{source}: {name} must be a number (got {value!r})") from None
    upper = 1.0 if name in ("flip_p", "cond_dropout") else float("inf")
    if not 0.0 <= number <= upper:
        bound = "between 0 and 1" if upper == 1.0 else "0 or more"
        raise MetadataError(f"{source}: {name} must be {bound} (got {number})")
    return number


def parse_ed2_yaml(text: str, source: str) -> dict[str, Any]:
    """EveryDream2 metadata: main_prompt, tags (strings or {tag, weight}), multiply, flip_p, cond_dropout,
    loss_scale, batch_id, shuffle_tags. Unknown keys are ignored, as EveryDream2 does."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MetadataError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MetadataError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    meta: dict[str, Any] = {}
    if data.get("main_prompt") is not None:
        meta["main_prompt"] = str(data["main_prompt"]).strip()
    if data.get("tags") is not None:
        if not isinstance(data["tags"], list):
            raise MetadataError(f"{source}: tags must be a list")
        tags, weights = [], []
        for item in data["tags"]:
            if isinstance(item, dict):
                if "tag" not in item:
                    raise MetadataError(f"{source}: each tag mapping needs a 'tag' key (got {item!r})")
                tags.append(str(item["tag"]).strip())
                weights.append(_float_field("weight", item.get("weight", 1.0), source))
            else:
                tags.append(str(item).strip())
                weights.append(1.0)
        meta["tags"], meta["tag_weights"] = tags, weights
    for name in ED2_FLOAT_FIELDS:
        if data.get(name) is not None:
            meta[name] = _float_field(name, data[name], source)
    if data.get("batch_id") is not None:
        meta["batch_id"] = str(data["batch_id"]).strip()
    if data.get("shuffle_tags") is not None:
        if not isinstance(data["shuffle_tags"], bool):
            raise MetadataError(f"{source}: shuffle_tags must be true or false (got {data['shuffle_tags']!r})")
        meta["shuffle_tags"] = data["shuffle_tags"]
    return meta


class MetadataReader:
    """Resolves EveryDream2 metadata per image, reading each folder's files once."""

    def __init__(self, data_root: Path, result_warnings: list[str], guard: RootGuard):
        self.data_root = data_root
        self.warnings = result_warnings
        self.guard = guard
        self._folder_cache: dict[tuple[Path, str], dict[str, Any]] = {}

    def _readable(self, path: Path) -> bool:
        return path.is_file() and self.guard.allows(path)

    def _read(self, path: Path) -> str:
        return read_text(path, self.warnings, self.data_root)

    def _folder_meta(self, folder: Path, kind: str) -> dict[str, Any]:
        key = (folder, kind)
        if key not in self._folder_cache:
            meta: dict[str, Any] = {}
            if kind == "global":
                for name in ("global.yaml", "global.yml"):
                    if self._readable(folder / name):
                        meta.update(parse_ed2_yaml(self._read(folder / name), _rel(folder / name, self.data_root)))
            else:
                for filename, name in ED2_FOLDER_FILES.items():
                    path = folder / filename
                    if self._readable(path):
                        value = _first_line(self._read(path))
                        source = _rel(path, self.data_root)
                        meta[name] = value if name == "batch_id" else _float_field(name, value, source)
                for name in ("local.yaml", "local.yml"):
                    if self._readable(folder / name):
                        meta.update(parse_ed2_yaml(self._read(folder / name), _rel(folder / name, self.data_root)))
            self._folder_cache[key] = meta
        return self._folder_cache[key]

    def metadata(self, image: Path) -> dict[str, Any]:
        """Merge global.yaml (root first) -> folder .txt files -> local.yaml -> the image's own .yaml."""
        meta: dict[str, Any] = {}
        folder = image.parent
        chain = [folder, *folder.parents]
        chain = chain[: chain.index(self.data_root) + 1] if self.data_root in chain else [folder]
        for ancestor in reversed(chain):
            meta.update(self._folder_meta(ancestor, "global"))
        meta.update(self._folder_meta(folder, "local"))
        for suffix in (".yaml", ".yml"):
            sidecar = image.with_suffix(suffix)
            if self._readable(sidecar):
                meta.update(parse_ed2_yaml(self._read(sidecar), _rel(sidecar, self.data_root)))
                break
        return meta

    def sidecar_caption(self, image: Path, extensions: list[str]) -> str | None:
        for extension in extensions:
            sidecar = image.with_suffix(extension)
            if self._readable(sidecar):
                caption = _first_line(self._read(sidecar))
                if caption:
                    return caption
        return None


def find_mask(candidate: Candidate, cfg: ScanParams, guard: RootGuard) -> str | None:
    image = candidate.path
    beside = image.with_name(f"{image.stem}{cfg.mask_suffix}.png")
    options = [beside]
    if cfg.masks_dir:
        options.append((guard.data_root / cfg.masks_dir / candidate.rel).with_suffix(".png"))
    for mask in options:
        if mask.is_file() and guard.allows(mask):
            return _rel(mask, guard.data_root)
    return None


def _caption(candidate: Candidate, meta: dict[str, Any], reader: MetadataReader, cfg: ScanParams) -> tuple[str, str]:
    """Fallback order: sidecar, then yaml main_prompt, then the file name (when enabled), then class tokens."""
    sidecar = reader.sidecar_caption(candidate.path, cfg.caption_extensions)
    if sidecar:
        return sidecar, "sidecar"
    if meta.get("main_prompt"):
        return meta["main_prompt"], "yaml"
    if cfg.caption_from_filename:
        text = candidate.path.stem.split("_")[0].strip()
        if text:
            return text, "filename"
    return candidate.concept.class_tokens, "class_tokens"


def _image_row(
    candidate: Candidate, probe: dict[str, Any], size: int, reader: MetadataReader, cfg: ScanParams
) -> dict[str, Any]:
    meta = reader.metadata(candidate.path)
    caption, caption_source = _caption(candidate, meta, reader, cfg)
    concept = candidate.concept
    return {
        "image_id": probe["image_id"],
        "path": candidate.rel,
        "width": probe["width"],
        "height": probe["height"],
        "file_size": size,
        "format": probe["format"],
        "mode": probe["mode"],
        "notes": probe["notes"],
        "is_reg": concept.is_reg,
        "subset": concept.subset,
        "repeats": concept.repeats,
        "class_tokens": concept.class_tokens,
        "caption": caption,
        "caption_source": caption_source,
        "yaml_tags": meta.get("tags", []),
        "yaml_tag_weights": meta.get("tag_weights", []),
        "batch_id": meta.get("batch_id"),
        "multiply": meta.get("multiply", 1.0),
        "flip_p": meta.get("flip_p"),
        "cond_dropout": meta.get("cond_dropout"),
        "loss_scale": meta.get("loss_scale", 1.0),
        "shuffle_tags": meta.get("shuffle_tags"),
        "mask_path": find_mask(candidate, cfg, reader.guard),
        "has_alpha": probe["has_alpha"],
    }


def _summary(images: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> dict[str, Any]:
    subsets: dict[str, dict[str, Any]] = {}
    for row in images:
        entry = subsets.setdefault(row["subset"], {"images": 0, "repeats": row["repeats"], "is_reg": row["is_reg"]})
        entry["images"] += 1
    return {
        "images": len(images),
        "train_images": sum(not row["is_reg"] for row in images),
        "reg_images": sum(row["is_reg"] for row in images),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(row["reason"] for row in rejected).items())),
        "subsets": dict(sorted(subsets.items())),
        "caption_sources": dict(sorted(Counter(row["caption_source"] for row in images).items())),
        "notes": dict(sorted(Counter(note for row in images for note in row["notes"]).items())),
        "masks": sum(row["mask_path"] is not None for row in images),
    }


def scan(
    data_root: Path,
    cfg: ScanParams,
    probe_cache: dict[str, dict[str, Any]] | None = None,
    save_probes: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[ScanResult, list[dict[str, Any]]]:
    """Scan a data root; return the result and the new probe-cache rows.

    Writes nothing itself. save_probes, when given, receives the probe-cache rows every
    CHECKPOINT_SECONDS while decoding and once more if the scan is interrupted or fails, so a killed
    scan of a large tree resumes where it stopped.
    """
    result_warnings: list[str] = []
    candidates, rejected = discover(data_root, cfg, result_warnings)
    probe_cache = probe_cache or {}
    guard = RootGuard(data_root, rejected, result_warnings)

    stats: dict[str, os.stat_result] = {}
    probes: dict[str, dict[str, Any]] = {}
    to_probe: list[Candidate] = []
    for candidate in candidates:
        if not guard.allows(candidate.path):
            continue
        try:
            stats[candidate.rel] = candidate.path.stat()
        except OSError as exc:
            rejected.append({"path": candidate.rel, "reason": "unreadable", "detail": f"{exc.__class__.__name__}: {exc.strerror}"})
            continue
        cached = probe_cache.get(candidate.rel)
        stat = stats[candidate.rel]
        if cached and cached["size"] == stat.st_size and cached["mtime_ns"] == stat.st_mtime_ns:
            probes[candidate.rel] = cached
        else:
            to_probe.append(candidate)
    reused = len(probes)

    def cache_rows() -> list[dict[str, Any]]:
        return [
            {**probe, "path": rel, "size": stats[rel].st_size, "mtime_ns": stats[rel].st_mtime_ns, "probe_version": PROBE_VERSION}
            for rel, probe in sorted(probes.items())
            if probe.get("reason") not in UNCACHED_REASONS
        ]

    last_save = time.monotonic()
    try:
        for candidate, probe in zip(to_probe, _iter_probes([str(c.path) for c in to_probe], cfg), strict=True):
            probes[candidate.rel] = probe
            if save_probes and time.monotonic() - last_save > CHECKPOINT_SECONDS:
                save_probes(cache_rows())
                last_save = time.monotonic()
    except BaseException:
        # Interrupted (Ctrl-C, a kill, a full disk): keep every image decoded so far.
        if save_probes:
            save_probes(cache_rows())
        raise
    new_cache = cache_rows()

    reader = MetadataReader(data_root, result_warnings, guard)
    images: list[dict[str, Any]] = []
    first_path: dict[str, str] = {}
    for candidate in sorted(candidates, key=lambda c: c.rel):
        probe = probes.get(candidate.rel)
        if probe is None:
            continue
        if probe.get("reason"):
            rejected.append({"path": candidate.rel, "reason": probe["reason"], "detail": probe["detail"]})
            continue
        width, height = probe["width"], probe["height"]
        if min(width, height) < cfg.min_side:
            detail = f"{width}x{height}: shorter side below scan.min_side={cfg.min_side}"
            rejected.append({"path": candidate.rel, "reason": "too_small", "detail": detail})
            continue
        if width * height > cfg.max_pixels:
            detail = f"{width}x{height} is over scan.max_pixels={cfg.max_pixels}"
            rejected.append({"path": candidate.rel, "reason": "too_large", "detail": detail})
            continue
        if probe["image_id"] in first_path:
            rejected.append({"path": candidate.rel, "reason": "duplicate", "detail": f"same bytes as {first_path[probe['image_id']]}"})
            continue
        try:
            row = _image_row(candidate, probe, stats[candidate.rel].st_size, reader, cfg)
        except MetadataError as exc:
            rejected.append({"path": candidate.rel, "reason": "bad_metadata", "detail": str(exc)})
            continue
        first_path[probe["image_id"]] = candidate.rel
        images.append(row)

    rejected.sort(key=lambda row: (row["path"], row["reason"]))
    result = ScanResult(images, rejected, _summary(images, rejected), len(to_probe), reused, result_warnings)
    return result, new_cache


def file_rows(images: list[dict[str, Any]], data_root: Path) -> list[dict[str, Any]]:
    """files.parquet: per image, what determines its pixels (and its mask's), sorted by image_id."""
    rows = []
    for image in sorted(images, key=lambda row: row["image_id"]):
        mask = image["mask_path"]
        rows.append(
            {
                **{name: image[name] for name in FILES_SCHEMA.names if name in image},
                "mask_sha256": hashlib.sha256((data_root / mask).read_bytes()).hexdigest() if mask else None,
            }
        )
    return rows


class EmptyDataset(KilnError):
    """No image was accepted: every later stage would fail on it, each in its own words. `result` holds
    the rejected rows, which the CLI names before this message."""

    def __init__(self, message: str, result: ScanResult):
        super().__init__(message)
        self.result = result


def _check_not_empty(result: ScanResult, paths: ScanPaths) -> None:
    if result.images:
        return
    rejected = len(result.rejected)
    files = "1 file" if rejected == 1 else f"{rejected} files"
    why = f"{files} found, all rejected (see {paths.rejected})" if rejected else "no image files found"
    raise EmptyDataset(f"{paths.data_root}: no images to train on: {why}. {layout_hint(paths.data_root)}", result)


def run(cfg: ScanParams, paths: ScanPaths) -> ScanResult:
    """Scan paths.data_root; write images.parquet, files.parquet, rejected.parquet, summary.json, probe cache.

    When no image is accepted, only rejected.parquet, summary.json and the probe cache are written (so the
    user can read why), any earlier images.parquet and files.parquet are removed (no later stage runs on
    a stale dataset), and EmptyDataset is raised."""
    def save_probes(rows: list[dict[str, Any]]) -> None:
        write_table(rows, PROBE_SCHEMA, paths.probe_cache)

    result, new_cache = scan(paths.data_root, cfg, _load_probe_cache(paths.probe_cache), save_probes)
    if result.images:
        write_table(result.images, IMAGES_SCHEMA, paths.images)
        write_table(file_rows(result.images, paths.data_root), FILES_SCHEMA, paths.files)
    else:
        paths.images.unlink(missing_ok=True)
        paths.files.unlink(missing_ok=True)
    write_table(result.rejected, REJECTED_SCHEMA, paths.rejected)
    write_json(result.summary, paths.summary)
    write_table(new_cache, PROBE_SCHEMA, paths.probe_cache)
    _check_not_empty(result, paths)
    return result
