"""`kiln tag`: tag images with a WD14 ONNX tagger or zero-shot CLIP into data/tag/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline import tag
from pipeline.images import allow_pixels
from stages.common import (
    DataRootOption,
    ParamsOption,
    SetOption,
    console,
    load,
    report_failures,
    run_single,
    user_errors,
)


@user_errors
def main(
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    files: Annotated[Path, typer.Option(help="The scan stage's file table.")] = Path("data/scan/files.parquet"),
    data_root: DataRootOption = Path("data/raw"),
    out: Annotated[Path, typer.Option(help="Where tags.parquet, tag_frequency.json and the cache go.")] = Path(
        "data/tag"
    ),
) -> None:
    """Tag images: tag.backend wd14 (model.onnx + selected_tags.csv) or clip (a vocabulary file).

    Tags are cached per image, model and thresholds: a rerun only tags new images.
    """
    loaded = load(params, overrides)
    # Open every image scan accepted, however large: one pixel limit for all stages.
    allow_pixels(loaded.scan.max_pixels)
    result = tag.run(loaded.tag, tag.TagPaths(files, data_root, out))
    top = sorted(
        ((name, count) for counts in result.frequency.values() for name, count in counts.items()),
        key=lambda item: -item[1],
    )[:8]
    console.print(
        f"tag: {len(result.rows)} images tagged ({result.ran} now, {result.from_cache} from the cache); "
        f"most frequent: {', '.join(name for name, _ in top) or 'none'}"
    )
    report_failures(result.failures)


if __name__ == "__main__":
    run_single(main)
