"""Stage `caption`: a transformers image-to-text model (BLIP, BLIP-2, GIT ...) captions the images.

What kohya's finetune/make_captions.py does, as a stage that only runs new images: model captions are
cached per (image_id, model identity, generation params), and the policy (`caption.mode`) and the
normalisation are applied after the cache, so changing them never reruns the model.

With no `caption.model` (the default) the stage runs no model: every caption passes through as scan read
it. With one, only the captions the model writes or extends are normalised; a caption the model did not
touch is kept byte for byte, as kohya trains a sidecar as it is.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

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
from pipeline.params import CaptionParams
from pipeline.tables import read_table, require, write_table

log = logging.getLogger(__name__)

CAPTIONS_SCHEMA = pa.schema([("image_id", pa.string()), ("caption", pa.string()), ("source", pa.string())])
CACHE_SCHEMA = pa.schema([("cache_key", pa.string()), ("image_id", pa.string()), ("caption", pa.string())])
# Captions the user wrote: `missing` mode never replaces them.
USER_SOURCES = {"sidecar", "yaml"}


@dataclass(frozen=True)
class CaptionPaths(ModelStagePaths):
    @property
    def captions(self) -> Path:
        return self.out_dir / "captions.parquet"


@dataclass
class CaptionResult(CachedRun):
    rows: list[dict[str, Any]] = field(default_factory=list)
    model_captioned: int = 0

    def sources(self) -> dict[str, tuple[int, str]]:
        """Per caption source (sidecar, yaml, filename, class_tokens, model:<name>): how many images, and
        the first one's caption (by image_id), for the console summary."""
        found: dict[str, tuple[int, str]] = {}
        for row in self.rows:
            count, example = found.get(row["source"], (0, row["caption"]))
            found[row["source"]] = (count + 1, example)
        return dict(sorted(found.items()))


def normalise(text: str, cfg: CaptionParams) -> str:
    """Strip, collapse whitespace, optionally lower-case, apply regex replacements, drop repeated phrases."""
    text = re.sub(r"\s+", " ", text).strip()
    if cfg.lowercase:
        text = text.lower()
    for replacement in cfg.replacements:
        text = re.sub(replacement.pattern, replacement.replace, text)
    text = re.sub(r"\s+", " ", text).strip()
    if cfg.dedupe_phrases:
        phrases, seen = [], set()
        for phrase in (part.strip() for part in text.split(",")):
            if phrase and phrase not in seen:
                seen.add(phrase)
                phrases.append(phrase)
        text = ", ".join(phrases)
    return text


def needs_model(row: dict[str, Any], cfg: CaptionParams) -> bool:
    """The model captions this image: a model is set, the image is a train image (or caption.reg_images
    asks for reg images too; kohya trains a reg image on its own caption, else its class tokens), and the
    mode wants it (`missing` keeps the user's sidecar and yaml captions)."""
    if cfg.model is None or (row["is_reg"] and not cfg.reg_images):
        return False
    return cfg.mode != "missing" or row["caption_source"] not in USER_SOURCES


def combine(existing: str, generated: str, mode: str, separator: str) -> str:
    if mode == "append" and existing:
        return f"{existing}{separator}{generated}"
    if mode == "prepend" and existing:
        return f"{generated}{separator}{existing}"
    return generated


class Captioner:
    """A transformers image-to-text model, called on a batch of RGB images."""

    def __init__(self, folder: Path, cfg: CaptionParams):
        import torch
        from transformers import AutoProcessor

        try:
            from transformers import AutoModelForImageTextToText as AutoCaptioner
        except ImportError:  # transformers < 4.46
            from transformers import AutoModelForVision2Seq as AutoCaptioner

        self.cfg = cfg
        self.device, self.dtype = resolve_device(cfg.device, cfg.dtype)
        remote = cfg.trust_remote_code
        self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=remote)
        self.model = AutoCaptioner.from_pretrained(folder, trust_remote_code=remote, **dtype_argument(self.dtype))
        self.model.to(self.device).eval()
        self._torch = torch

    def __call__(self, images: list[Any]) -> list[str]:
        prompts = [self.cfg.prompt] * len(images) if self.cfg.prompt else None
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        inputs = {
            name: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
            for name, value in inputs.items()
        }
        with self._torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, num_beams=self.cfg.num_beams)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def run(cfg: CaptionParams, paths: CaptionPaths, captioner_factory: Any = Captioner) -> CaptionResult:
    """Write captions.parquet (every image: image_id, caption, source) and update the model cache."""
    require(paths.images, "scan")
    images = sorted(read_table(paths.images, "scan"), key=lambda row: row["image_id"])
    todo = [row for row in images if needs_model(row, cfg)]
    result = CaptionResult(cache={})
    generated: dict[str, str] = {}
    source = ""
    if todo:
        assert cfg.model is not None  # needs_model is false for every image without one
        model = resolve_model(cfg.model, "caption.model")
        source = f"model:{model.name}"
        identity = fingerprint(model.folder)
        device, dtype = resolve_device(cfg.device, cfg.dtype)
        keys = {
            row["image_id"]: cache_key(
                image_id=row["image_id"], model=identity, prompt=cfg.prompt, max_new_tokens=cfg.max_new_tokens,
                num_beams=cfg.num_beams, dtype=str(dtype),
            )
            for row in todo
        }
        run_result = run_cached(
            todo, keys, paths.cache, CACHE_SCHEMA, lambda: captioner_factory(model.folder, cfg),
            lambda caption: {"caption": caption}, paths.data_root, cfg.batch_size, cfg.workers, "caption",
        )
        result = CaptionResult(**vars(run_result))
        cache = result.cache
        generated = {row["image_id"]: cache[keys[row["image_id"]]]["caption"] for row in todo if keys[row["image_id"]] in cache}
    elif not paths.cache.is_file():
        # A declared, persistent output: kept (with its captions) while the model is off, made when new.
        write_table([], CACHE_SCHEMA, paths.cache)
    for row in images:
        caption, row_source = row["caption"] or "", row["caption_source"]
        if row["image_id"] in generated:
            caption = normalise(combine(caption, generated[row["image_id"]], cfg.mode, cfg.separator), cfg)
            row_source = source
            result.model_captioned += 1
        result.rows.append({"image_id": row["image_id"], "caption": caption, "source": row_source})
    write_table(result.rows, CAPTIONS_SCHEMA, paths.captions)
    return result
