"""Errors a user is meant to read: the CLI prints their message on one line, never a traceback."""


class KilnError(Exception):
    """A problem with the user's input, params or environment, worded for the user."""


class ParamsError(KilnError):
    """params.yaml or a --set override is invalid."""
