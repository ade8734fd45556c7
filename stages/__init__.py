"""Kiln's command line: one thin Typer module per stage, each calling its pipeline/ function."""
