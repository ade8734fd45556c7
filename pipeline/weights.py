"""Writing safetensors files with deterministic bytes, atomically.

safetensors keeps its header's maps (the metadata and the tensor index) in hash order, so two saves of
the same tensors and metadata differ byte for byte. DVC's "only changed steps rerun" needs identical
bytes for identical inputs, so the header is rewritten with sorted keys. The compact JSON of the same
content has the same length, so the data offsets, which count from the end of the header, do not move.

Text encoders are written with transformers 4's CLIP key names, which every tool that reads them expects.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.tables import honour_umask, write_json


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
        honour_umask(tmp)  # safetensors 0.8 creates its files 0600 whatever the umask
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def canonical_clip_name(key: str) -> str:
    """A CLIP text encoder's weight or module name as checkpoints, kohya and transformers 4 spell it:
    `text_model.`-prefixed (transformers 5 drops the prefix from CLIPTextModel's names)."""
    return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"


def canonical_clip_keys(state: dict[str, Any]) -> dict[str, Any]:
    """canonical_clip_name for every key; the position_ids buffer is not a weight. Works on a weight_map too."""
    return {canonical_clip_name(key): value for key, value in state.items() if not key.endswith("position_ids")}


def canonical_clip_folder(folder: Path) -> None:
    """Rewrite a saved CLIP text encoder (its safetensors files, sharded or not, and any shard index) with
    transformers 4's key names. transformers 5 saves CLIPTextModel without the `text_model.` prefix, and
    transformers 4, kohya's pinned stack and ComfyUI's CLIP loader then load a random text encoder with only
    a warning; transformers 5 itself reads either layout."""
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        save_safetensors(canonical_clip_keys(tensors), file, metadata)
    for index in sorted(folder.glob("*.safetensors.index*.json")):  # model.safetensors.index.json, and variants'
        content = json.loads(index.read_text(encoding="utf-8"))
        content["weight_map"] = canonical_clip_keys(content["weight_map"])
        write_json(content, index)
