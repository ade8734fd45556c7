"""`kiln import kohya|everydream`: turn a kohya-ss or EveryDream2 config into params.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from stages.common import ParamsOption, console, user_errors

app = typer.Typer(
    help="Convert a kohya-ss/sd-scripts or EveryDream2 training config into a Kiln params.yaml.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

OutOption = Annotated[Path, typer.Option("--out", "-o", help="The params file to write.", metavar="PATH")]
ForceOption = Annotated[bool, typer.Option("--force", help="Overwrite --out when it exists.")]


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


if TYPE_CHECKING:
    from pipeline import importers


def _finish(imported: importers.Imported, base: importers.Base, out: Path) -> None:
    from pipeline import importers  # here, not at the top: `kiln --help` stays fast

    text = importers.render(imported, base, str(out))
    say = lambda line="": console.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"mapped ({len(imported.mapped)}):")
    for mapped in imported.mapped.values():
        note = f"  ({mapped.note})" if mapped.note else ""
        say(f"  {mapped.source:<40} -> {mapped.key:<34} {_show(mapped.value)}{note}")
    say(f"not mapped ({len(imported.unmapped)}):")
    for unmapped in imported.unmapped:
        say(f"  {unmapped.source} = {_show(unmapped.value)}: {unmapped.reason}")
    if imported.layout:
        say("data layout:")
        for line in imported.layout:
            say(f"  {line}")
        for command in imported.commands:
            say(f"  $ {command}")
    importers.write_params(text, out)
    say(f"wrote {out}")


@app.command("kohya")
@user_errors
def kohya(
    config_file: Annotated[Path, typer.Option("--config_file", "--config-file", help="kohya's training config (TOML).", metavar="PATH")],
    dataset_config: Annotated[
        Path | None, typer.Option("--dataset_config", "--dataset-config", help="kohya's dataset config (TOML or JSON).", metavar="PATH")
    ] = None,
    out: OutOption = Path("params.yaml"),
    params: ParamsOption = Path("params.yaml"),
    force: ForceOption = False,
) -> None:
    """Import a kohya-ss/sd-scripts training config and dataset config."""
    from pipeline import importers

    importers.check_out(out, force)
    base = importers.load_base(params)
    config, dataset = importers.read_kohya(config_file, dataset_config)
    _finish(importers.import_kohya(config, dataset, str(config_file), base.data_root), base, out)


@app.command("everydream")
@user_errors
def everydream(
    train_json: Annotated[Path, typer.Argument(help="EveryDream2's train.json.", metavar="TRAIN_JSON")],
    optimizer_json: Annotated[
        Path | None, typer.Argument(help="Its optimizer.json (default: the one train.json names).", metavar="[OPTIMIZER_JSON]")
    ] = None,
    out: OutOption = Path("params.yaml"),
    params: ParamsOption = Path("params.yaml"),
    force: ForceOption = False,
) -> None:
    """Import an EveryDream2 train.json (and its optimizer.json)."""
    from pipeline import importers

    importers.check_out(out, force)
    base = importers.load_base(params)
    train, optimizer, validation, optimizer_name = importers.read_everydream(train_json, optimizer_json)
    imported = importers.import_everydream(train, optimizer, validation, str(train_json), optimizer_name, base.data_root)
    _finish(imported, base, out)
