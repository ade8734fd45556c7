"""Stage `balance`: decide what one epoch trains, as data/plan/plan.parquet.

One row per image: its latent cache keys, its final caption, its repeats per epoch (kohya folder
repeats x EveryDream2 multiply, with regularisation images balanced against the train images), its
loss weight, and the per-image EveryDream2 fields the loader applies.
"""

from __future__ import annotations

import logging
import math
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import KilnError
from pipeline.params import BalanceParams, TrainParams
from pipeline.tables import read_table, require, write_json, write_table

log = logging.getLogger(__name__)

PLAN_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("subset", pa.string()),
        ("is_reg", pa.bool_()),
        ("cache_key", pa.string()),
        ("flip_cache_key", pa.string()),
        ("bucket", pa.string()),
        ("caption", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("class_tokens", pa.string()),
        ("repeats", pa.float64()),
        ("loss_weight", pa.float64()),
        ("batch_id", pa.string()),
        ("flip_p", pa.float64()),
        ("cond_dropout", pa.float64()),
        ("shuffle_tags", pa.bool_()),
        ("loss_scale", pa.float64()),
    ]
)


@dataclass(frozen=True)
class BalancePaths:
    images: Path
    buckets: Path
    keys: Path  # data/latents/keys.parquet
    manifest: Path  # data/latents/manifest.parquet: the latents the store holds
    captions: Path | None
    tags: Path | None
    out_dir: Path

    @property
    def plan(self) -> Path:
        return self.out_dir / "plan.parquet"

    @property
    def summary(self) -> Path:
        return self.out_dir / "summary.json"


@dataclass
class BalanceResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def examples(self, count: int = 3) -> list[tuple[str, str]]:
        """(path, final caption) of a few images that train, one per concept folder first (by path), so
        the console shows what the model will read before a GPU hour is spent on it."""
        training = sorted((row for row in self.rows if row["repeats"] > 0), key=lambda row: row["path"])
        firsts = list({row["subset"]: row for row in reversed(training)}.values())[::-1]
        rest = [row for row in training if row not in firsts]
        return [(row["path"], row["caption"]) for row in (firsts + rest)[:count]]


def balance_reg_repeats(reg_repeats: list[float], target: float) -> tuple[list[float], int]:
    """kohya's DreamBooth reg loop: register each reg image (in order) with its own repeats until the
    total reaches target; then add one repeat to each in turn until it does. Returns the new repeats
    (0 for an unused image) and how many images went unused."""
    balanced = [0.0] * len(reg_repeats)
    if not reg_repeats or target <= 0:
        return balanced, len(reg_repeats)
    total, first_pass = 0.0, True
    while total < target:
        for index, repeats in enumerate(reg_repeats):
            if first_pass:
                balanced[index] = repeats
                total += repeats
            elif balanced[index] > 0:
                balanced[index] += 1
                total += 1
            if total >= target:
                break
        first_pass = False
    return balanced, sum(1 for repeats in balanced if repeats == 0)


def _phrases(text: str) -> list[str]:
    return [phrase.strip() for phrase in text.split(",") if phrase.strip()]


def compose_caption(caption: str, tags: list[str], class_tokens: str, cfg: BalanceParams) -> str:
    """The template filled in, then the prefix and suffix; empty -> the class tokens.

    The caption is kept as written (kohya trains a sidecar caption as it is). A tag, the class tokens, the
    prefix or the suffix whose every comma-separated phrase is already there is dropped, and so is the
    separator in front of an empty field.
    """
    seen: set[str] = set()

    def fresh(unit: str) -> str:
        phrases = _phrases(unit)
        if all(phrase in seen for phrase in phrases):
            return ""
        seen.update(phrases)
        return unit.strip()

    fields = {"caption": lambda: fresh(caption or ""), "class_tokens": lambda: fresh(class_tokens or ""),
              "tags": lambda: ", ".join(kept for kept in (fresh(tag) for tag in tags) if kept)}
    pieces: list[str] = []
    for literal, name, _, _ in string.Formatter().parse(cfg.caption_template):
        value = fields[name]() if name is not None else ""
        # ", " before an empty field is dropped; other text ("photo of ") stays.
        pieces.append(literal if value or literal.strip(", ") else "")
        pieces.append(value)
    text = "".join(pieces).strip(", ")
    prefix, suffix = fresh(cfg.caption_prefix), fresh(cfg.caption_suffix)
    return ", ".join(part for part in (prefix, text, suffix) if part) or (class_tokens or "")


def _optional_table(path: Path | None, written_by: str) -> dict[str, dict[str, Any]]:
    if path is None or not path.is_file():
        return {}
    return {row["image_id"]: row for row in read_table(path, written_by)}


def _steps(group_sizes: list[int], batch_size: int, remainder: str) -> int:
    rounding = math.floor if remainder == "drop" else math.ceil
    return sum(rounding(size / batch_size) for size in group_sizes)


def build_plan(paths: BalancePaths, cfg: BalanceParams, train: TrainParams) -> BalanceResult:
    for table, stage in ((paths.images, "scan"), (paths.buckets, "bucket"), (paths.keys, "cache"), (paths.manifest, "cache")):
        require(table, stage)
    images = sorted(read_table(paths.images, "scan"), key=lambda row: row["path"])
    buckets = {row["image_id"]: row for row in read_table(paths.buckets, "bucket")}
    index = {row["cache_key"] for row in read_table(paths.manifest, "cache")}
    keys: dict[tuple[str, bool], str] = {
        (row["image_id"], row["flip"]): row["cache_key"] for row in read_table(paths.keys, "cache")
    }
    captions, tags = _optional_table(paths.captions, "caption"), _optional_table(paths.tags, "tag")
    warnings: list[str] = []

    rows = []
    for image in images:
        image_id = image["image_id"]
        key = keys.get((image_id, False))
        if key is None or image_id not in buckets:
            raise KilnError(f"{image['path']}: its latent is not in the cache; run `kiln cache`")
        if key not in index:
            # keys.parquet lists it, so `kiln cache` saw this image and stored no latent: it failed to
            # encode it, and rerunning cache alone would fail again.
            raise KilnError(
                f"{image['path']}: `kiln cache` could not encode this image (it printed why); "
                "fix or remove it, then rerun from `kiln scan`"
            )
        flip_key = keys.get((image_id, True))
        caption = captions[image_id]["caption"] if image_id in captions else image["caption"]
        image_tags = list(dict.fromkeys([*image["yaml_tags"], *(tags[image_id]["tags"] if image_id in tags else [])]))
        rows.append(
            {
                "image_id": image_id, "path": image["path"], "subset": image["subset"], "is_reg": image["is_reg"],
                "cache_key": key, "flip_cache_key": flip_key if flip_key in index else None,
                "bucket": buckets[image_id]["bucket"],
                "caption": compose_caption(caption, image_tags, image["class_tokens"], cfg),
                "tags": image_tags, "class_tokens": image["class_tokens"],
                # kohya folder repeats times EveryDream2 multiply; a fraction is drawn per epoch by the loader.
                "repeats": image["repeats"] * image["multiply"],
                "loss_weight": (cfg.prior_loss_weight if image["is_reg"] else 1.0) * image["loss_scale"],
                "batch_id": image["batch_id"], "flip_p": image["flip_p"], "cond_dropout": image["cond_dropout"],
                "shuffle_tags": image["shuffle_tags"], "loss_scale": image["loss_scale"],
            }
        )

    train_total = sum(row["repeats"] for row in rows if not row["is_reg"])
    reg_rows = [row for row in rows if row["is_reg"]]  # sorted by path: the stable order kohya walks
    unused = 0
    if not reg_rows:
        if cfg.reg_mode != "none":
            warnings.append("no regularisation images: training without prior preservation")
    elif cfg.reg_mode != "none":
        target = train_total * (cfg.reg_ratio if cfg.reg_mode == "ratio" else 1.0)
        balanced, unused = balance_reg_repeats([row["repeats"] for row in reg_rows], target)
        for row, repeats in zip(reg_rows, balanced, strict=True):
            row["repeats"] = repeats
        if unused:
            warnings.append(f"{unused} of {len(reg_rows)} regularisation images are unused: the others already match the train images' {train_total:g} repeats")
    for message in warnings:
        log.warning(message)

    groups = Counter()
    per_bucket: Counter[str] = Counter()
    for row in rows:
        groups[(row["bucket"], row["batch_id"])] += row["repeats"]
        per_bucket[row["bucket"]] += row["repeats"]
    summary = {
        "train_images": sum(not row["is_reg"] for row in rows),
        "reg_images": sum(row["is_reg"] and row["repeats"] > 0 for row in rows),
        "reg_images_unused": unused,
        "train_samples_per_epoch": train_total,
        "reg_samples_per_epoch": sum(row["repeats"] for row in reg_rows),
        "samples_per_epoch": sum(row["repeats"] for row in rows),
        "batch_size": train.batch_size,
        "steps_per_epoch": _steps([round(size) for size in groups.values()], train.batch_size, train.bucket_remainder),
        "buckets": {bucket: per_bucket[bucket] for bucket in sorted(per_bucket)},
    }
    rows.sort(key=lambda row: row["image_id"])
    return BalanceResult(rows, summary, warnings)


def run(cfg: BalanceParams, train: TrainParams, paths: BalancePaths) -> BalanceResult:
    result = build_plan(paths, cfg, train)
    write_table(result.rows, PLAN_SCHEMA, paths.plan)
    write_json(result.summary, paths.summary)
    return result
