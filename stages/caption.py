"""`kiln caption`: caption images with a transformers image-to-text model into data/caption/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline import caption
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
    images: Annotated[Path, typer.Option(help="The scan stage's image table.")] = Path("data/scan/images.parquet"),
    data_root: DataRootOption = Path("data/raw"),
    out: Annotated[Path, typer.Option(help="Where captions.parquet and the model cache go.")] = Path("data/caption"),
) -> None:
    """Caption images with BLIP, BLIP-2, GIT or any transformers image-to-text model (caption.model).

    caption.mode: missing (only images without a sidecar or yaml caption), overwrite, append or prepend.
    Model captions are cached per image, model and generation params: a rerun only captions new images.
    """
    loaded = load(params, overrides)
    # Open every image scan accepted, however large: one pixel limit for all stages.
    allow_pixels(loaded.scan.max_pixels)
    result = caption.run(loaded.caption, caption.CaptionPaths(images, data_root, out))
    console.print(
        f"caption: {len(result.rows)} images; {result.model_captioned} with a model caption "
        f"({result.ran} generated now, {result.from_cache} from the cache)"
    )
    report_failures(result.failures)


if __name__ == "__main__":
    run_single(main)
