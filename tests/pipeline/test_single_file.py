"""The original single-file layout, proven by reading Kiln's files back through diffusers' own converter."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from pipeline.errors import KilnError
from pipeline.presets import preset_dir
from pipeline.sd import load_components, single_file_family
from pipeline.single_file import open_clip_to_original, original_state_dict, save_single_file


def assert_same_weights(expected, actual):
    want, got = expected.state_dict(), actual.state_dict()
    assert set(want) == set(got)
    unequal = [name for name in want if not torch.equal(want[name], got[name])]
    assert not unequal, unequal[:5]


@pytest.mark.parametrize(("preset", "cls"), [("tiny-sd15", StableDiffusionPipeline), ("tiny-sdxl", StableDiffusionXLPipeline)])
def test_round_trip_through_diffusers_from_single_file(preset, cls, tmp_path):
    folder = preset_dir(preset)
    pipeline = cls.from_pretrained(folder)
    xl = preset == "tiny-sdxl"
    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if xl else [])
    path = save_single_file(tmp_path / "model.safetensors", "sdxl" if xl else "sd", pipeline.unet, pipeline.vae, encoders, {"kiln": "1"})
    back = cls.from_single_file(str(path), config=str(folder))
    for part in ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if xl else []):
        assert_same_weights(getattr(pipeline, part), getattr(back, part))
    assert single_file_family(path) == ("sdxl" if xl else "sd")


def test_key_names_are_the_original_ones():
    pipeline = StableDiffusionPipeline.from_pretrained(preset_dir("tiny-sd15"), safety_checker=None)
    state = original_state_dict("sd", pipeline.unet, pipeline.vae, [pipeline.text_encoder])
    # tiny-sd15: two down blocks of one resnet each; LDM numbers them after conv_in (input_blocks.0).
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",  # conv_in
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",  # down_blocks.0.resnets.0.conv1
        "model.diffusion_model.input_blocks.2.0.op.weight",  # down_blocks.0.downsamplers.0
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.out.2.bias",  # conv_out
        "first_stage_model.decoder.up.0.block.0.norm1.weight",  # decoder levels are numbered in reverse
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ]:
        assert key in state, key
    # The VAE's attention is a 1x1 convolution in the original layout.
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4
    assert not any(key.startswith(("down_blocks", "unet.")) for key in state)


@pytest.mark.parametrize("prefix", ["cond_stage_model.model.", "conditioner.embedders.1.model."])
def test_open_clip_layout_matches_diffusers_reader(prefix):
    """SD 2.x's encoder and SDXL's second: diffusers' OpenCLIP reader must give back the original weights."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    xl = prefix.startswith("conditioner")
    config = CLIPTextConfig(
        vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=77, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    model = CLIPTextModelWithProjection(config) if xl else CLIPTextModel(config)
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("position_ids")}
    state = {key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}": value for key, value in state.items()}
    original = open_clip_to_original(state, prefix)
    assert original[f"{prefix}transformer.resblocks.1.attn.in_proj_weight"].shape == (72, 24)  # q, k, v fused
    if xl:
        assert original[f"{prefix}text_projection"].shape == (24, 16)  # x @ P in OpenCLIP
    back = convert_open_clip_checkpoint(model, original, prefix=prefix)
    assert set(back) == set(state)
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_loading_a_single_file_base_needs_its_configs_offline(tmp_path):
    pipeline = StableDiffusionPipeline.from_pretrained(preset_dir("tiny-sd15"), safety_checker=None)
    path = save_single_file(tmp_path / "base.safetensors", "sd", pipeline.unet, pipeline.vae, [pipeline.text_encoder], {})
    components = load_components(str(path), config="tiny-sd15")
    assert components.family == "sd" and components.pipeline is not None
    assert_same_weights(pipeline.unet, components.unet)
    assert components.scaling_factor == pipeline.vae.config.scaling_factor
    # Offline with no config (HF_HUB_OFFLINE is set for the tests), the error says what to set.
    with pytest.raises(KilnError, match=r"model.base: cannot load the sd checkpoint .*base.safetensors: .*set model.config"):
        load_components(str(path))


def test_a_legacy_ckpt_base_loads_without_unpickling_code(tmp_path):
    pipeline = StableDiffusionPipeline.from_pretrained(preset_dir("tiny-sd15"), safety_checker=None)
    state = original_state_dict("sd", pipeline.unet, pipeline.vae, [pipeline.text_encoder])
    torch.save({"state_dict": state}, tmp_path / "base.ckpt")  # A1111's .ckpt nesting
    components = load_components(str(tmp_path / "base.ckpt"), config="tiny-sd15")
    assert_same_weights(pipeline.unet, components.unet)
    # A .ckpt that holds a pickled object, not only tensors, is refused (weights_only=True).
    torch.save({"state_dict": state, "hook": EvilButHarmless()}, tmp_path / "evil.ckpt")
    with pytest.raises(KilnError, match=r"^model\.base: .*evil\.ckpt holds pickled Python objects \(tests\.pipeline\.test_single_file\.EvilButHarmless\) that Kiln does not load") as refused:
        load_components(str(tmp_path / "evil.ckpt"), config="tiny-sd15")
    assert "weights_only" not in str(refused.value)  # never the unsafe way round


class EvilButHarmless:
    """Stands for an arbitrary pickled object: loading it would run its module's code."""


def test_a_damaged_single_file_names_the_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(KilnError, match="broken.safetensors is not a readable checkpoint"):
        load_components(str(path), config="tiny-sd15")


def test_saved_precision_and_metadata(tmp_path):
    pipeline = StableDiffusionPipeline.from_pretrained(preset_dir("tiny-sd15"), safety_checker=None)
    path = save_single_file(tmp_path / "m.safetensors", "sd", pipeline.unet, pipeline.vae, [pipeline.text_encoder], {"ss_steps": "3"}, torch.float16)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"ss_steps": "3"}
        assert handle.get_tensor("model.diffusion_model.input_blocks.0.0.weight").dtype == torch.float16
    assert not list(tmp_path.glob(".*tmp"))
