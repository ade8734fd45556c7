"""What every stage CLI shares: the --params/--set options, logging, and user-facing errors.

Kept light, as every stage module is: `kiln --help` imports them all, so torch, diffusers and the
pyarrow- or pydantic-heavy pipeline modules are imported inside the commands that use them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from pipeline.errors import KilnError

if TYPE_CHECKING:
    from pipeline.params import Params

console = Console(soft_wrap=True)
err_console = Console(stderr=True)

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="The params file; one section per stage.", metavar="PATH")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-S",
        help="Override one value, as `dvc exp run -S` does: --set bucket.resolution=768. Repeatable.",
        metavar="SECTION.KEY=VALUE",
        show_default=False,
    ),
]

DataRootOption = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        help="The folder image paths are relative to (holding train/ and reg/). Default: scan.data_root from params.yaml.",
        metavar="PATH",
        show_default=False,
    ),
]

F = TypeVar("F", bound=Callable[..., Any])


def report_failures(failures: list[str]) -> None:
    """Images a model stage could not process: each named, so the user can fix or remove it."""
    for failure in failures:
        console.print(f"  [red]failed[/] {failure}", highlight=False)


def setup_logging() -> None:
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler], force=True)


def load(params: Path, overrides: list[str] | None) -> Params:
    from pipeline.params import load_params

    return load_params(params, overrides or [])


def user_errors(command: F) -> F:
    """Print a KilnError as one red line per problem and exit 2; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return command(*args, **kwargs)
        except KilnError as exc:
            for line in str(exc).splitlines():
                err_console.print(f"[bold red]error:[/] {line}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            # A full disk or a permission problem: name the file; atomic writes kept the old outputs.
            where = f"{exc.filename}: " if exc.filename else ""
            err_console.print(f"[bold red]error:[/] {where}{exc.strerror or exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: finished outputs were kept; rerun to continue")
            # The last line: a Ctrl-C inside `import torch` leaves torch's loggers unconfigured, and its
            # exit hook would log cache statistics through ours.
            logging.disable(logging.INFO)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def run_single(command: Callable[..., Any]) -> None:
    """Entry point for `python -m stages.<stage>`."""
    app = typer.Typer(add_completion=False)
    app.command()(command)
    app()
