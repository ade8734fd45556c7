"""`kiln report`: the run's metrics and output hashes against the committed baseline, as Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import KilnError
from stages.common import console, run_single, user_errors


@user_errors
def main(
    run: Annotated[Path, typer.Option(help="The training run's folder.")] = Path("models/kiln"),
    out: Annotated[Path, typer.Option(help="Where the Markdown report goes.")] = Path("reports/experiment.md"),
    tolerance: Annotated[
        float, typer.Option(help="Relative tolerance for metrics; 0 asks for bit-for-bit equality (same CPU and torch).")
    ] = 0.0,
    revision: Annotated[str, typer.Option(help="The git revision holding the baseline dvc.lock and metrics.")] = "HEAD",
) -> None:
    """Compare this workspace's dvc.lock outputs and metrics.json with the committed ones and write a report
    (metrics with deltas, the loss curve, the latest sample grid). Exits 2 when the run did not reproduce."""
    from pipeline.report import build_report

    report = build_report(run, out, tolerance, revision)
    console.print(f"report: wrote {out}")
    if not report.reproduced:
        problems = [f"changed output {key}" for key in report.changed_outputs] + report.metric_failures
        raise KilnError("not reproduced against " + revision + ":\n" + "\n".join(problems))


if __name__ == "__main__":
    run_single(main)
