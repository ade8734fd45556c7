"""Stage artifacts on disk: Parquet tables and JSON files whose bytes depend only on their content.

DVC stops a `repro` early when a stage's outputs hash as before, so identical inputs must give
identical bytes: explicit schemas, sorted rows, no timestamps, and atomic replacement so that a killed
stage never leaves half a file behind. Every file Kiln writes gets the mode the user's umask gives
(`honour_umask`), so that a UI or a container running as another user can read it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import KilnError


def _umask() -> int:
    """The process's umask, read without changing it. Linux (4.7 on) reports it in /proc/self/status; a
    read at import would miss a later os.umask. Elsewhere the only way is to set it and restore it, which
    is racy: the strict 0o077 makes a file another thread creates in between private, never exposed."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def honour_umask(path: Path) -> None:
    """Give a written file the mode a plain open() would have given it, 0o666 less the umask. mkstemp and
    safetensors 0.8 create files 0600 whatever the umask, which a UI or a container running as another
    user cannot read."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file beside path, then rename it over path: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        honour_umask(tmp)  # before the rename, so the file never appears with mkstemp's 0600
        os.replace(tmp, path)
    except OSError as exc:
        # pyarrow's I/O errors rarely carry the file name; a user with a full disk needs it.
        raise KilnError(f"{path}: could not write ({exc}); the previous version, if any, is kept") from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_table(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    """Write rows (already in their final order) as a Parquet file with exactly this schema."""
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def require(path: Path, written_by: str) -> None:
    """A stage's input exists, or one line naming the stage that writes it."""
    if not Path(path).is_file():
        raise KilnError(f"{path}: not found; run `kiln {written_by}` first")


class DamagedTable(KilnError):
    """A Parquet file that exists but cannot be read: truncated, zero bytes, or not Parquet at all."""


def read_table(path: Path, written_by: str | None = None) -> list[dict[str, Any]]:
    """The rows of a Parquet file. A damaged file is a DamagedTable naming it (pyarrow's own errors name no
    file, or end as a traceback); `written_by` is the stage that writes it, which the message says to rerun."""
    try:
        return pq.read_table(path).to_pylist()
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        # pyarrow's message may start with the path again; one line is enough.
        reason = " ".join(str(exc).removeprefix(f"Could not open Parquet input source '{path}': ").split())
        remedy = f"rerun `kiln {written_by}`" if written_by else "rerun the stage that writes it"
        raise DamagedTable(f"{path}: damaged, not a readable Parquet file ({reason}); {remedy}") from exc


def write_json(data: Any, path: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
