"""Writing safetensors files with deterministic bytes, atomically.

safetensors keeps its header's maps (the metadata and the tensor index) in hash order, so two saves of
the same tensors and metadata differ byte for byte. DVC's "only changed steps rerun" needs identical
bytes for identical inputs, so the header is rewritten with sorted keys. The compact JSON of the same
content has the same length, so the data offsets, which count from the end of the header, do not move.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file


def canonical_header(path: Path) -> None:
    """Rewrite the header of the safetensors file at `path` in place with sorted keys."""
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > length:  # never seen: safetensors writes the same compact JSON
            raise ValueError(f"{path}: the sorted safetensors header is longer than the original")
        handle.seek(8)
        handle.write(canonical + b" " * (length - len(canonical)))  # safetensors pads with spaces too


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors (and string metadata) to `path`: a temporary file, sorted header, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        canonical_header(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
