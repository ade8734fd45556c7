"""`kiln scan`: ingest and validate data/raw/{train,reg} into data/scan/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline import scan
from stages.common import ParamsOption, SetOption, console, load, run_single, user_errors


@user_errors
def main(
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    data_root: Annotated[Path, typer.Option(help="Folder holding train/ and reg/ (kohya layout).")] = Path("data/raw"),
    out: Annotated[Path, typer.Option(help="Where images.parquet, rejected.parquet and summary.json go.")] = Path(
        "data/scan"
    ),
) -> None:
    """Scan data/raw: decode and hash every image, read captions and EveryDream2 metadata, reject bad files.

    Folders are kohya concept folders, `<repeats>_<class tokens>` (for example `train/10_sks dog`).
    Captions come from a .txt/.caption sidecar, an EveryDream2 .yaml, the file name, or the class tokens.
    """
    cfg = load(params, overrides).scan
    result = scan.run(cfg, scan.ScanPaths(data_root, out))
    summary = result.summary
    table = Table(title=f"scan: {summary['images']} images, {summary['rejected']} rejected")
    for column in ("subset", "images", "repeats", "reg"):
        table.add_column(column)
    for subset, entry in summary["subsets"].items():
        table.add_row(subset, str(entry["images"]), str(entry["repeats"]), "yes" if entry["is_reg"] else "")
    console.print(table)
    for reason, count in summary["rejected_by_reason"].items():
        console.print(f"  rejected [yellow]{reason}[/]: {count} (see {out / 'rejected.parquet'})")
    console.print(f"  decoded {result.probed}, reused {result.reused} unchanged from the probe cache")


if __name__ == "__main__":
    run_single(main)
