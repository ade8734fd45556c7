"""`kiln scan`: ingest and validate data/raw/{train,reg} into data/scan/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from stages.common import DataRootOption, ParamsOption, SetOption, console, load, run_single, user_errors

# Rejected images named one per line before the rest are counted; rejected.parquet lists them all.
SHOW_REJECTED = 5


def report_rejected(rejected: list[dict[str, Any]], table: Path) -> None:
    """The first few rejected files with their reason, so the user sees what to fix without opening Parquet."""
    for row in rejected[:SHOW_REJECTED]:
        console.print(f"  [yellow]rejected[/] {row['path']}: {row['reason']} ({row['detail']})", highlight=False)
    if len(rejected) > SHOW_REJECTED:
        console.print(f"  ... and {len(rejected) - SHOW_REJECTED} more (see {table})", highlight=False)


@user_errors
def main(
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    data_root: DataRootOption = None,
    out: Annotated[Path, typer.Option(help="Where images.parquet, rejected.parquet and summary.json go.")] = Path(
        "data/scan"
    ),
) -> None:
    """Scan data/raw: decode and hash every image, read captions and EveryDream2 metadata, reject bad files.

    Folders are kohya concept folders, `<repeats>_<class tokens>` (for example `train/10_sks dog`).
    Captions come from a .txt/.caption sidecar, an EveryDream2 .yaml, the file name, or the class tokens.
    """
    from pipeline import scan

    cfg = load(params, overrides).scan
    paths = scan.ScanPaths(data_root or Path(cfg.data_root), out)
    try:
        result = scan.run(cfg, paths)
    except scan.EmptyDataset as exc:
        report_rejected(exc.result.rejected, paths.rejected)
        raise
    summary = result.summary
    table = Table(title=f"scan: {summary['images']} images, {summary['rejected']} rejected")
    for column in ("subset", "images", "repeats", "reg"):
        table.add_column(column)
    for subset, entry in summary["subsets"].items():
        table.add_row(subset, str(entry["images"]), str(entry["repeats"]), "yes" if entry["is_reg"] else "")
    console.print(table)
    for reason, count in summary["rejected_by_reason"].items():
        console.print(f"  rejected [yellow]{reason}[/]: {count}")
    report_rejected(result.rejected, paths.rejected)
    console.print(f"  decoded {result.probed}, reused {result.reused} unchanged from the probe cache")


if __name__ == "__main__":
    run_single(main)
