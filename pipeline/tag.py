"""Stage `tag`: WD14-style ONNX taggers, or zero-shot CLIP over a vocabulary, cached per image.

WD14 taggers (what kohya's tag_images_by_wd14_tagger.py runs) take NHWC float32 BGR in 0..255, padded
to a square on white; they output one sigmoid score per row of selected_tags.csv (category 0 general,
4 character, 9 rating). The tags that pass the thresholds are cached per (image_id, model identity,
thresholds); formatting (underscores, replacements, blacklist, order, max_tags) runs after the cache.

With no `tag.model` (the default) the stage runs no model and writes an empty table: only the tags of
EveryDream2 yaml sidecars reach the captions. Regularisation images are tagged only when tag.reg_images
asks (kohya trains a reg image on its own caption, else its class tokens).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.errors import KilnError
from pipeline.inference import (
    CachedRun,
    ModelStagePaths,
    cache_key,
    dtype_argument,
    fingerprint,
    resolve_device,
    resolve_model,
    run_cached,
)
from pipeline.params import TagParams
from pipeline.tables import read_table, require, write_json, write_table

log = logging.getLogger(__name__)

GENERAL, CHARACTER, RATING = 0, 4, 9

TAGS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float64())),
        ("source", pa.string()),
    ]
)
CACHE_SCHEMA = pa.schema(
    [
        ("cache_key", pa.string()),
        ("image_id", pa.string()),
        ("names", pa.list_(pa.string())),
        ("categories", pa.list_(pa.int32())),
        ("scores", pa.list_(pa.float64())),
    ]
)


@dataclass(frozen=True)
class TagPaths(ModelStagePaths):
    @property
    def tags(self) -> Path:
        return self.out_dir / "tags.parquet"

    @property
    def frequency(self) -> Path:
        return self.out_dir / "tag_frequency.json"


@dataclass
class TagResult(CachedRun):
    rows: list[dict[str, Any]] = field(default_factory=list)
    frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    model: str | None = None  # the tagger's name; None when tagging is off

    def example(self) -> list[str]:
        """The first tagged image's tags (by image_id), for the console summary."""
        return next((row["tags"] for row in self.rows if row["tags"]), [])


def is_reg(row: dict[str, Any]) -> bool:
    """files.parquet's subset is `reg` or `reg/<folder>` for a regularisation image."""
    return row["subset"].split("/")[0] == "reg"


# A tag is a list of (name, category, score) as the model gave it, before formatting.
RawTags = list[tuple[str, int, float]]


def read_selected_tags(path: Path) -> list[tuple[str, int]]:
    """selected_tags.csv: columns tag_id, name, category (0 general, 4 character, 9 rating)."""
    if not path.is_file():
        raise KilnError(f"{path}: missing; a WD14 tagger folder holds model.onnx and selected_tags.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"name", "category"} <= set(reader.fieldnames):
            raise KilnError(f"{path}: needs the columns tag_id, name, category (found {reader.fieldnames})")
        return [(row["name"], int(row["category"])) for row in reader]


def wd14_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) float32, BGR, 0..255: padded to a square on white, then resized, as WD14 expects."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    # Area filtering when shrinking (what the reference taggers' cv2.INTER_AREA does), bicubic when growing.
    resample = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
    pixels = np.asarray(square.resize((size, size), resample), dtype=np.float32)
    return np.ascontiguousarray(pixels[:, :, ::-1])


class WD14Tagger:
    def __init__(self, folder: Path, cfg: TagParams):
        import onnxruntime

        model_path = folder / "model.onnx"
        if not model_path.is_file():
            raise KilnError(f"{model_path}: missing; a WD14 tagger folder holds model.onnx and selected_tags.csv")
        self.cfg = cfg
        self.tags = read_selected_tags(folder / "selected_tags.csv")
        device, _ = resolve_device(cfg.device, "float32")
        available = onnxruntime.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(str(model_path), providers=providers)
        graph_input = self.session.get_inputs()[0]
        shape = graph_input.shape  # (batch, height, width, 3): NHWC
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
            raise KilnError(f"{model_path}: input {graph_input.name} has shape {shape}; a WD14 tagger takes (N, H, W, 3)")
        self.input_name, self.size = graph_input.name, int(shape[1])
        outputs = self.session.get_outputs()[0].shape
        if outputs[-1] != len(self.tags):
            raise KilnError(f"{model_path}: outputs {outputs[-1]} scores but selected_tags.csv lists {len(self.tags)} tags")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return wd14_preprocess(image, self.size)

    def __call__(self, batch: list[np.ndarray]) -> list[RawTags]:
        scores = self.session.run(None, {self.input_name: np.stack(batch)})[0]
        return [self.select(row) for row in scores]

    def select(self, scores: np.ndarray) -> RawTags:
        """Thresholds per category; of the rating tags, only the best is kept (formatting may drop it)."""
        kept: RawTags = []
        best_rating: tuple[str, int, float] | None = None
        for (name, category), score in zip(self.tags, scores.tolist(), strict=True):
            if category == RATING:
                if best_rating is None or score > best_rating[2]:
                    best_rating = (name, category, score)
            elif category == CHARACTER and score >= self.cfg.character_threshold:
                kept.append((name, category, score))
            elif category == GENERAL and score >= self.cfg.general_threshold:
                kept.append((name, category, score))
        return kept + ([best_rating] if best_rating else [])


class ClipTagger:
    """Zero-shot tagging: cosine similarity between the image and each vocabulary entry."""

    def __init__(self, folder: Path, cfg: TagParams, vocabulary: list[str]):
        import torch
        from transformers import AutoModel, AutoProcessor

        self.cfg, self.vocabulary, self._torch = cfg, vocabulary, torch
        self.device, self.dtype = resolve_device(cfg.device, cfg.dtype)
        remote = cfg.trust_remote_code
        self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=remote)
        self.model = AutoModel.from_pretrained(folder, trust_remote_code=remote, **dtype_argument(self.dtype))
        self.model.to(self.device).eval()
        text = self.processor(text=vocabulary, return_tensors="pt", padding=True)
        with torch.inference_mode():
            features = self.model.get_text_features(**{k: v.to(self.device) for k, v in text.items()})
        self.text_embeds = self._normalised(features)  # (vocabulary, dim)

    def _normalised(self, features: Any) -> Any:
        # transformers 5 returns a model output whose pooler_output is the projected embedding.
        features = features if isinstance(features, self._torch.Tensor) else features.pooler_output
        features = features.float()
        return features / features.norm(dim=-1, keepdim=True)

    def preprocess(self, image: Image.Image) -> Image.Image:
        return image

    def __call__(self, images: list[Image.Image]) -> list[RawTags]:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        with self._torch.inference_mode():
            image_embeds = self._normalised(self.model.get_image_features(pixel_values=pixels))
        similarity = (image_embeds @ self.text_embeds.T).cpu().numpy()  # (images, vocabulary)
        return [
            [(self.vocabulary[i], GENERAL, float(row[i])) for i in np.argsort(-row, kind="stable") if row[i] >= self.cfg.clip_threshold]
            for row in similarity
        ]


def read_vocabulary(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise KilnError(f"tag.vocabulary: {path} not found (a text file with one tag per line)")
    words = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines()]
    words = list(dict.fromkeys(word for word in words if word and not word.startswith("#")))
    if not words:
        raise KilnError(f"tag.vocabulary: {path} has no tags")
    return words


def _display_name(name: str, cfg: TagParams) -> str:
    # Kaomoji such as ^_^ or o_o keep their underscores: only word-like tags are rewritten.
    if cfg.underscores_to_spaces and re.search(r"[A-Za-z]{2}", name):
        name = name.replace("_", " ")
    return cfg.replacements.get(name, name)


def format_tags(raw: RawTags, cfg: TagParams) -> tuple[list[str], list[float]]:
    """Apply naming, replacements, blacklist, rating choice, max_tags and ordering to raw model tags."""
    blacklist = {_display_name(tag, cfg) for tag in cfg.blacklist} | set(cfg.blacklist)
    entries: dict[str, tuple[int, float]] = {}
    for name, category, score in raw:
        if category == RATING and not cfg.include_ratings:
            continue
        shown = _display_name(name, cfg)
        if shown in blacklist or (shown in entries and entries[shown][1] >= score):
            continue
        entries[shown] = (category, score)
    ranked = sorted(entries.items(), key=lambda item: -item[1][1])
    if cfg.max_tags is not None:
        ranked = ranked[: cfg.max_tags]
    if cfg.backend == "clip" and cfg.top_k is not None:
        ranked = ranked[: cfg.top_k]

    def group(category: int) -> int:
        # Ratings lead (kohya puts them first); character tags lead the rest when asked.
        if category == RATING:
            return 0
        if category == CHARACTER and cfg.character_tags_first:
            return 1
        return 2

    ordered = sorted(ranked, key=lambda item: (group(item[1][0]), -item[1][1]))
    return [name for name, _ in ordered], [round(score, 6) for _, (_, score) in ordered]


def tag_frequency(rows: list[dict[str, Any]], images: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per concept folder, how many images carry each tag: kohya's `ss_tag_frequency`."""
    subset = {row["image_id"]: row["subset"] for row in images}
    counts: dict[str, Counter[str]] = {}
    for row in rows:
        counts.setdefault(subset[row["image_id"]], Counter()).update(set(row["tags"]))
    return {name: dict(sorted(counter.items())) for name, counter in sorted(counts.items())}


def _model_key(cfg: TagParams, identity: str, vocabulary: list[str]) -> dict[str, Any]:
    if cfg.backend == "wd14":
        return {"backend": "wd14", "model": identity, "general": cfg.general_threshold, "character": cfg.character_threshold}
    words = hashlib.sha256("\n".join(vocabulary).encode()).hexdigest()
    return {"backend": "clip", "model": identity, "vocabulary": words, "threshold": cfg.clip_threshold}


def make_tagger(folder: Path, cfg: TagParams, vocabulary: list[str]) -> Any:
    return WD14Tagger(folder, cfg) if cfg.backend == "wd14" else ClipTagger(folder, cfg, vocabulary)


def run(cfg: TagParams, paths: TagPaths, tagger_factory: Any = make_tagger) -> TagResult:
    """Write tags.parquet and tag_frequency.json, running the model only for uncached images."""
    require(paths.images, "scan")
    # files.parquet (no captions), so a caption edit never reruns tagging.
    images = sorted(read_table(paths.images, "scan"), key=lambda row: row["image_id"])
    if cfg.model is None:
        if not paths.cache.is_file():  # a declared, persistent output: kept while tagging is off
            write_table([], CACHE_SCHEMA, paths.cache)
        result = TagResult(cache={})
        write_table(result.rows, TAGS_SCHEMA, paths.tags)
        write_json(result.frequency, paths.frequency)
        return result
    images = [row for row in images if cfg.reg_images or not is_reg(row)]
    vocabulary = read_vocabulary(cfg.vocabulary) if cfg.backend == "clip" else []
    model = resolve_model(cfg.model, "tag.model")
    model_key = _model_key(cfg, fingerprint(model.folder), vocabulary)
    keys = {row["image_id"]: cache_key(image_id=row["image_id"], **model_key) for row in images}

    def to_cache_row(raw: RawTags) -> dict[str, Any]:
        names, categories, scores = zip(*raw, strict=True) if raw else ((), (), ())
        return {"names": list(names), "categories": list(categories), "scores": [float(s) for s in scores]}

    run_result = run_cached(
        images, keys, paths.cache, CACHE_SCHEMA, lambda: tagger_factory(model.folder, cfg, vocabulary),
        to_cache_row, paths.data_root, cfg.batch_size, cfg.workers, "tag",
    )
    result = TagResult(**vars(run_result), model=model.name)
    cache = result.cache
    source = f"{cfg.backend}:{model.name}"
    for row in images:
        cached = cache.get(keys[row["image_id"]])
        if cached is None:
            continue  # the model failed on this image; reported above, retried next run
        raw = list(zip(cached["names"], cached["categories"], cached["scores"], strict=True))
        tags, scores = format_tags(raw, cfg)
        result.rows.append({"image_id": row["image_id"], "tags": tags, "scores": scores, "source": source})
    result.frequency = tag_frequency(result.rows, images)
    write_table(result.rows, TAGS_SCHEMA, paths.tags)
    write_json(result.frequency, paths.frequency)
    return result
