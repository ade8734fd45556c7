"""`kiln cache`: encode bucketed crops with the VAE into the latent store, data/latents/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import KilnError
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
    gc: Annotated[bool, typer.Option("--gc", help="Drop the latents no current input uses (the store is left as a fresh build would write it).")] = False,
    buckets: Annotated[Path, typer.Option(help="The bucket stage's table.")] = Path("data/bucket/buckets.parquet"),
    files: Annotated[Path, typer.Option(help="The scan stage's file table.")] = Path("data/scan/files.parquet"),
    data_root: DataRootOption = None,
    store: Annotated[Path, typer.Option(help="The latent store (shards, index.parquet).")] = Path("data/latents"),
) -> None:
    """Encode every bucketed crop with the VAE of model.base (or cache.vae) into sharded tars.

    Only latents the store lacks are encoded; damaged shards are detected and re-encoded; a killed run
    resumes where it stopped. Run on several GPUs with `accelerate launch --num_processes N -m stages.cache`.
    An image that cannot be encoded is named, and the stage exits non-zero once every other latent is stored.
    """
    from pipeline import cache
    from pipeline.images import allow_pixels

    loaded = load(params, overrides)
    # Open every image scan accepted, however large: one pixel limit for all stages.
    allow_pixels(loaded.scan.max_pixels)
    result = cache.run(
        loaded.cache, loaded.model.base, loaded.bucket.interpolation,
        cache.CachePaths(buckets, files, data_root or Path(loaded.scan.data_root), store), gc=gc,
        base_config=loaded.model.config,
    )
    console.print(
        f"cache: {result.encoded} encoded, {result.reused} reused, {result.repaired} repaired, "
        f"{result.garbage} garbage" + (f", {result.collected} collected" if gc else "")
        + (f", {result.nan_fallbacks} batches re-encoded in fp32" if result.nan_fallbacks else "")
    )
    report_failures(result.failures)
    if result.failures:
        # Exit non-zero so that `dvc repro` stops here: balance and train cannot do without these latents.
        raise KilnError(
            f"{len(result.failures)} of {sum(result.buckets.values())} latents could not be encoded (named above); "
            "the others are stored. Fix or remove those images, then rerun from `kiln scan`"
        )


if __name__ == "__main__":
    run_single(main)
