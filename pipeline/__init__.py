"""Kiln: the library. Typed config and pure stage functions; no CLI code lives here."""

__version__ = "0.1.0"
