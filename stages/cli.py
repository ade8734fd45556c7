"""The `kiln` command: one sub-command per stage, in pipeline order."""

from __future__ import annotations

import typer

from stages import balance, bucket, cache, caption, demo_data, params, report, scan, tag, train

app = typer.Typer(
    name="kiln",
    help="Kiln: a cached, incremental Stable Diffusion fine-tuning pipeline. "
    "Each stage reads and writes the files dvc.yaml declares; `dvc repro` runs the graph.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
app.command("demo-data")(demo_data.main)
app.command("scan")(scan.main)
app.command("caption")(caption.main)
app.command("tag")(tag.main)
app.command("bucket")(bucket.main)
app.command("cache")(cache.main)
app.command("balance")(balance.main)
app.command("train")(train.main)
app.command("params")(params.main)
app.command("report")(report.main)


if __name__ == "__main__":
    app()
