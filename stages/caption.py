"""`kiln caption`: caption images with a transformers image-to-text model into data/caption/."""

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
    images: Annotated[Path, typer.Option(help="The scan stage's image table.")] = Path("data/scan/images.parquet"),
    data_root: DataRootOption = None,
    out: Annotated[Path, typer.Option(help="Where captions.parquet and the model cache go.")] = Path("data/caption"),
) -> None:
    """Caption images with BLIP, BLIP-2, GIT or any transformers image-to-text model (caption.model).

    Off unless caption.model names one: captions then pass through from sidecars, yaml and folder names.
    caption.mode: missing (only images without a sidecar or yaml caption), overwrite, append or prepend;
    reg images only with caption.reg_images. Model captions are cached per image, model and generation
    params: a rerun only captions new images.
    """
    from pipeline import caption
    from pipeline.images import allow_pixels
    from pipeline.presets import KEY_PRESETS  # random models: fine for tests, noise on a real dataset

    loaded = load(params, overrides)
    # Open every image scan accepted, however large: one pixel limit for all stages.
    allow_pixels(loaded.scan.max_pixels)
    root = data_root or Path(loaded.scan.data_root)
    result = caption.run(loaded.caption, caption.CaptionPaths(images, root, out))
    model = loaded.caption.model
    state = f"model {model}" if model else "no model (caption.model is null): captions pass through"
    console.print(f"caption: {len(result.rows)} images, {state}", highlight=False)
    for source, (count, example) in result.sources().items():
        name = f"the model ({source.removeprefix('model:')})" if source.startswith("model:") else SOURCE_NAMES[source]
        console.print(f"  {count} from {name}: {example!r}", highlight=False)
    if model in KEY_PRESETS["caption.model"]:
        console.print(f"  [yellow]warning[/]: {model} is a random model for tests: its captions are noise")
    if result.model_captioned:
        console.print(f"  model captions: {result.ran} generated now, {result.from_cache} from the cache", highlight=False)
    report_failures(result.failures)


# How the console names each caption source (images.parquet's caption_source, or model:<name>).
SOURCE_NAMES = {
    "sidecar": "sidecar files", "yaml": "yaml sidecars", "filename": "file names",
    "class_tokens": "their folder's class tokens (no caption file)",
}


if __name__ == "__main__":
    run_single(main)
