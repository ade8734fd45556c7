"""`kiln tag`: tag images with a WD14 ONNX tagger or zero-shot CLIP into data/tag/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    data_root: DataRootOption = None,
    out: Annotated[Path, typer.Option(help="Where tags.parquet, tag_frequency.json and the cache go.")] = Path(
        "data/tag"
    ),
) -> None:
    """Tag images: tag.backend wd14 (model.onnx + selected_tags.csv) or clip (a vocabulary file).

    Off unless tag.model names a tagger; reg images only with tag.reg_images. Tags are cached per
    image, model and thresholds: a rerun only tags new images.
    """
    from pipeline import tag
    from pipeline.images import allow_pixels
    from pipeline.presets import KEY_PRESETS  # random models: fine for tests, noise on a real dataset

    loaded = load(params, overrides)
    # Open every image scan accepted, however large: one pixel limit for all stages.
    allow_pixels(loaded.scan.max_pixels)
    root = data_root or Path(loaded.scan.data_root)
    result = tag.run(loaded.tag, tag.TagPaths(files, root, out))
    if result.model is None:
        console.print("tag: off (tag.model is null): no tags added; yaml sidecar tags still reach the captions")
        return
    top = sorted(
        ((name, count) for counts in result.frequency.values() for name, count in counts.items()),
        key=lambda item: (-item[1], item[0]),
    )[:8]
    console.print(
        f"tag: {len(result.rows)} images tagged by {result.model} ({result.ran} now, {result.from_cache} from the cache); "
        f"most frequent: {', '.join(name for name, _ in top) or 'none'}",
        highlight=False,
    )
    console.print(f"  for example: {', '.join(result.example())!r}", highlight=False)
    if loaded.tag.model in KEY_PRESETS["tag.model"]:
        console.print(f"  [yellow]warning[/]: {loaded.tag.model} is a random model for tests: its tags are noise")
    report_failures(result.failures)


if __name__ == "__main__":
    run_single(main)
