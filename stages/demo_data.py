"""`kiln demo-data`: write the deterministic synthetic demo dataset into data/raw."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import console, run_single, user_errors


@user_errors
def main(
    out: Annotated[Path, typer.Option(help="The data root to write train/ and reg/ into.")] = Path("data/raw"),
    seed: Annotated[int, typer.Option(help="Seed for the drawings; the same seed gives the same bytes.")] = 0,
) -> None:
    """Write a small synthetic dataset (two kohya concepts and a reg folder) for the demo and tests.

    Files whose bytes are already right are left untouched. A folder holding anything else (your own
    images) is refused: nothing is written.
    """
    from pipeline.demo_data import write_demo_data

    counts = write_demo_data(out, seed)
    console.print(
        f"demo-data: {counts['images']} synthetic images in {out} "
        f"({counts['files_written']} files written, {counts['files_unchanged']} unchanged)"
    )
    console.print(
        "  the demo trains tiny-sd15, a random model built on the CPU: its LoRA and samples are noise. Captions "
        "come from the sidecars (caption.model and tag.model are null). Start a real run from configs/."
    )


if __name__ == "__main__":
    run_single(main)
