"""`kiln bucket`: aspect-ratio bucketing of data/scan/files.parquet into data/bucket/."""

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
    files: Annotated[Path, typer.Option(help="The scan stage's geometry table.")] = Path("data/scan/files.parquet"),
    out: Annotated[Path, typer.Option(help="Where buckets.parquet and buckets.json go.")] = Path("data/bucket"),
) -> None:
    """Assign every image to a kohya aspect-ratio bucket, with its resize and crop geometry.

    The bucket set comes from bucket.resolution, min_bucket_reso, max_bucket_reso and bucket_reso_steps.
    """
    from pipeline import bucket

    cfg = load(params, overrides).bucket
    result = bucket.run(cfg, bucket.BucketPaths(files, out))
    table = Table(title=f"bucket: {len(result.rows)} images in {len(result.counts)} buckets")
    for column in ("bucket", "aspect", "images"):
        table.add_column(column, justify="right")
    for entry in result.counts:
        table.add_row(entry["bucket"], f"{entry['aspect']:.2f}", str(entry["count"]))
    console.print(table)


if __name__ == "__main__":
    run_single(main)
