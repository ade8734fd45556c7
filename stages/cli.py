"""The `kiln` command: one sub-command per stage, in pipeline order.

Importing this module loads only the standard library: the console script imports it before main() can
catch a Ctrl-C. The app and its stage modules are built inside main(), and those import torch, diffusers
and the pipeline modules inside their commands, so `kiln --help` stays fast (tests/stages/test_cli.py).
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import typer


@functools.cache
def build_app() -> typer.Typer:
    import typer

    from stages import balance, bucket, cache, caption, demo_data, importer, params, report, scan, tag, train

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
    app.add_typer(importer.app, name="import")
    return app


def __getattr__(name: str) -> Any:
    """`from stages.cli import app` (tests, Typer's CliRunner): the app, built on first use."""
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """The `kiln` console script. A command's own Ctrl-C is handled by stages.common.user_errors; this
    catches one that lands before the command runs (while Typer and the stage modules load), as one line."""
    try:
        build_app()()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
