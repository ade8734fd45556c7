"""`kiln params`: validate params.yaml, print the resolved values, or document every key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from stages.common import ParamsOption, SetOption, console, load, run_single, user_errors


@user_errors
def main(
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    explain: Annotated[bool, typer.Option("--explain", help="Document every key: type, default, help.")] = False,
) -> None:
    """Validate params.yaml (with any --set overrides) and print the resolved values."""
    from pipeline.params import explain as explain_lines

    if explain:
        for line in explain_lines():
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        return
    resolved = load(params, overrides).model_dump(mode="json")
    console.print(yaml.safe_dump(resolved, sort_keys=False), highlight=False, markup=False, end="")


if __name__ == "__main__":
    run_single(main)
