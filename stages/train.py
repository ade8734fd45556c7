"""`kiln train`: train a LoRA on the cached latents into models/<train.output_name>/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, SetOption, console, load, run_single, user_errors


@user_errors
def main(
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    resume: Annotated[
        str,
        typer.Option(
            help="auto: continue this run's newest checkpoint if it has one (what `dvc repro` does after a Ctrl-C), "
            "else start fresh; latest: the same, but an error naming what differs when only other runs' (other params, "
            "plan or code) are there; none: always start fresh; or a checkpoint folder, taken even from another run "
            "(to train on for longer) with a warning naming what differs."
        ),
    ] = "auto",
    plan: Annotated[Path, typer.Option(help="The balance stage's plan.")] = Path("data/plan/plan.parquet"),
    latents: Annotated[str, typer.Option(help="The latent store: a folder, or a shard URL prefix (s3://...).")] = "data/latents",
    index: Annotated[Path, typer.Option(help="The latent index.")] = Path("data/latents/index.parquet"),
    models: Annotated[Path, typer.Option(help="Where models/<output_name>/ goes.")] = Path("models"),
) -> None:
    """Train a LoRA (kohya key format, ss_* metadata) with accelerate; Ctrl-C or SIGTERM saves a
    checkpoint that `kiln train` (or `dvc repro`) continues exactly. Several GPUs: `accelerate launch -m stages.train`."""
    from pipeline import train

    loaded = load(params, overrides)
    paths = train.TrainPaths(plan, latents, index, models, params, tuple(overrides or ()))
    result = train.run(loaded, paths, resume=resume)
    if result.output:
        last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        console.print(f"train: {result.global_step} steps, last loss {last}; wrote {result.output}")


if __name__ == "__main__":
    run_single(main)
