"""`kiln balance`: decide what one epoch trains, in data/plan/plan.parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stages.common import ParamsOption, SetOption, console, load, run_single, user_errors


@user_errors
def main(
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    images: Annotated[Path, typer.Option(help="The scan stage's image table.")] = Path("data/scan/images.parquet"),
    buckets: Annotated[Path, typer.Option(help="The bucket stage's table.")] = Path("data/bucket/buckets.parquet"),
    latents: Annotated[Path, typer.Option(help="The latent store (keys.parquet, manifest.parquet).")] = Path("data/latents"),
    captions: Annotated[Path, typer.Option(help="The caption stage's table, used when present.")] = Path(
        "data/caption/captions.parquet"
    ),
    tags: Annotated[Path, typer.Option(help="The tag stage's table, used when present.")] = Path("data/tag/tags.parquet"),
    out: Annotated[Path, typer.Option(help="Where plan.parquet and summary.json go.")] = Path("data/plan"),
) -> None:
    """Build the epoch plan: captions from balance.caption_template, repeats (kohya folders x
    EveryDream2 multiply), regularisation balancing (balance.reg_mode) and loss weights."""
    from pipeline import balance

    loaded = load(params, overrides)
    paths = balance.BalancePaths(
        images, buckets, latents / "keys.parquet", latents / "manifest.parquet", captions, tags, out
    )
    result = balance.run(loaded.balance, loaded.train, paths)
    summary = result.summary
    table = Table(title=f"balance: {summary['samples_per_epoch']:g} samples, {summary['steps_per_epoch']} steps per epoch")
    for column in ("", "images", "samples per epoch"):
        table.add_column(column, justify="right")
    table.add_row("train", str(summary["train_images"]), f"{summary['train_samples_per_epoch']:g}")
    table.add_row("reg", str(summary["reg_images"]), f"{summary['reg_samples_per_epoch']:g}")
    for bucket, samples in summary["buckets"].items():
        table.add_row(bucket, "", f"{samples:g}")
    console.print(table)
    console.print("training captions, for example:")
    for path, caption in result.examples():
        console.print(f"  {path}: {caption!r}", highlight=False)


if __name__ == "__main__":
    run_single(main)
