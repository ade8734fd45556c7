"""Deterministic safetensors files: identical tensors and metadata give identical bytes."""

import hashlib
import json
import struct

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.weights import save_safetensors


def test_identical_saves_give_identical_bytes_that_read_back(tmp_path):
    tensors = {f"layer_{i}.weight": torch.full((3, 2), float(i), dtype=torch.float16) for i in range(12)}
    tensors["scale"] = torch.arange(5, dtype=torch.float32)
    metadata = {f"ss_key_{i}": f"value {i} é" for i in range(40)}
    digests = set()
    for attempt in range(5):  # safetensors alone gives a different header order almost every time
        path = save_safetensors(tensors, tmp_path / f"{attempt}.safetensors", metadata)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == metadata
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert list(header["__metadata__"]) == sorted(metadata)
    assert not list((tmp_path).glob(".*.tmp"))  # written through a temporary file, then renamed
