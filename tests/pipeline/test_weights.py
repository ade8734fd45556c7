"""Safetensors files: identical tensors and metadata give identical bytes, the mode follows the umask, and
text encoders carry transformers 4's CLIP names."""

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.weights import canonical_clip_folder, save_safetensors
from tests.conftest import params_for, train_paths
from tests.pipeline.test_tables import umask


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


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_weights_get_the_mode_the_umask_gives(tmp_path, mask, mode):
    # safetensors 0.8 alone writes 0o600 whatever the umask (0.4 wrote 0o644).
    with umask(mask):
        path = save_safetensors({"a": torch.zeros(2)}, tmp_path / "a.safetensors")
    assert path.stat().st_mode & 0o777 == mode


def test_every_file_a_training_run_writes_is_readable_by_others_under_umask_022(sd15, tmp_path):
    from pipeline.train import run

    project, plan = sd15
    prompts = [{"prompt": "a square", "steps": 1, "width": 64, "height": 64}]
    settings = params_for("tiny-sd15", max_train_steps=2, save_every_n_steps=1, sample_prompts=prompts, sample_every_n_steps=2)
    with umask(0o022):
        result = run(settings, train_paths(project, plan, tmp_path))
    modes = {str(path.relative_to(tmp_path)): path.stat().st_mode & 0o777 for path in tmp_path.rglob("*") if path.is_file()}
    assert modes[str(result.output.relative_to(tmp_path))] == 0o644  # the LoRA
    # Every kind of writer took part: safetensors, torch.save, JSON, PNGs (samples and the loss plot).
    assert {"kiln/checkpoints/step-00000002/weights.safetensors", "kiln/checkpoints/step-00000002/optimizer.pt",
            "kiln/metrics.json", "kiln/loss.png", "kiln/samples/step-00000002.png"} <= modes.keys()
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}


def transformers4_clip_keys(config: Any, projection: bool) -> list[str]:
    """The weight names transformers 4 (4.30 to 4.57) reads for CLIPTextModel(WithProjection), from its
    modeling_clip: every module under `text_model` (a CLIPTextTransformer: embeddings, encoder.layers,
    final_layer_norm), and WithProjection's `text_projection` beside it, not under it."""
    layer = [f"{name}.{kind}" for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
        "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2",
    ) for kind in ("weight", "bias")]
    keys = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    keys += [f"text_model.encoder.layers.{i}.{name}" for i in range(config.num_hidden_layers) for name in layer]
    keys += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    return sorted(keys + ["text_projection.weight"] * projection)


def stored_keys(folder: Path) -> list[str]:
    """Every tensor name in the folder's safetensors files (all shards)."""
    keys = []
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys += handle.keys()
    return sorted(keys)


@pytest.mark.parametrize("projection", [False, True], ids=["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_a_sharded_text_encoder_gets_transformers_4_names_and_still_loads(tmp_path, projection):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    config = CLIPTextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=8, bos_token_id=0, eos_token_id=2,  # ids inside the tiny vocab
    )
    encoder = cls(config)
    folder = tmp_path / "text_encoder"
    encoder.save_pretrained(folder, safe_serialization=True, max_shard_size="10KB")
    assert len(list(folder.glob("*.safetensors"))) > 1  # the case under test: shards and their index
    canonical_clip_folder(folder)
    expected = transformers4_clip_keys(config, projection)
    assert stored_keys(folder) == expected
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(weight_map) == expected
    for key, file in weight_map.items():  # each name points at the shard that holds it
        with safe_open(str(folder / file), "pt") as handle:
            assert key in handle.keys()
    reloaded = cls.from_pretrained(folder).state_dict()
    assert reloaded.keys() == encoder.state_dict().keys()
    assert all(torch.equal(value, reloaded[key]) for key, value in encoder.state_dict().items())
