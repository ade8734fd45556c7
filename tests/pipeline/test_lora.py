import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.lora import (
    TEXT_ENCODER,
    UNET_ATTENTION,
    UNET_FEED_FORWARD,
    add_lora,
    kohya_module_name,
    kohya_state_dict,
    save_kohya_lora,
)
from pipeline.presets import preset_dir
from tests.conftest import unet_output


def tiny_pipeline():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(preset_dir("tiny-sd15"), safety_checker=None)


def test_kohya_keys_metadata_and_diffusers_round_trip(tmp_path):
    trained = tiny_pipeline()
    unet_params = add_lora(trained.unet, dim=4, alpha=2, dropout=0.0, targets=UNET_ATTENTION)
    te_params = add_lora(trained.text_encoder, dim=4, alpha=2, dropout=0.0, targets=TEXT_ENCODER)
    with torch.no_grad():  # stand-in for training: lora_up starts at zero, give it weights
        for param in unet_params + te_params:
            param.add_(torch.randn_like(param) * 0.5)
    state = kohya_state_dict([("lora_unet", trained.unet), ("lora_te", trained.text_encoder)], alpha=2)
    path = tmp_path / "demo.safetensors"
    save_kohya_lora(path, state, {"ss_network_dim": 4, "ss_network_alpha": "2.0", "ss_network_module": "networks.lora"})

    # tiny-sd15: 4 transformer blocks (down 1, mid 1, up 2) x (attn1 + attn2) x 4 projections = 32;
    # 2 text-encoder layers x 4 projections = 8.
    unet_modules = {key.rsplit(".", 2)[0] for key in state if key.startswith("lora_unet_")}
    te_modules = {key.rsplit(".", 2)[0] for key in state if key.startswith("lora_te_")}
    assert len(unet_modules) == 32 and len(te_modules) == 8
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet_modules
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0" in unet_modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_modules
    for module in unet_modules | te_modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(state)
    assert state["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 4
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata == {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_network_module": "networks.lora"}

    base = tiny_pipeline()
    before = unet_output(base)
    base.load_lora_weights(str(path))  # diffusers converts the kohya format itself
    after = unet_output(base)
    assert not torch.allclose(before, after)
    trained_output = unet_output(trained)
    torch.testing.assert_close(after, trained_output, atol=2e-2, rtol=2e-2)  # fp16 file, same network


def test_locon_adds_conv_layers_with_their_own_rank_and_alpha(tmp_path):
    trained = tiny_pipeline()
    params = add_lora(trained.unet, dim=4, alpha=2, dropout=0.0, targets=UNET_ATTENTION, conv_dim=2, conv_alpha=1)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn_like(param) * 0.3)
    state = kohya_state_dict([("lora_unet", trained.unet)], alpha=2)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert state[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)  # (conv_dim, in, k, k)
    assert state[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert state[f"{conv}.alpha"].item() == 1.0
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in state
    assert "lora_unet_conv_in.lora_down.weight" not in state
    attention = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert state[f"{attention}.lora_down.weight"].shape[0] == 4 and state[f"{attention}.alpha"].item() == 2.0
    path = tmp_path / "locon.safetensors"
    save_kohya_lora(path, state, {"ss_network_args": {"conv_dim": 2, "conv_alpha": 1}})
    base = tiny_pipeline()
    base.load_lora_weights(str(path))
    torch.testing.assert_close(unet_output(base), unet_output(trained), atol=2e-2, rtol=2e-2)


# kohya's key layout, family by family. The expected names are walked from each UNet config's published
# layout (kohya-ss/sd-scripts: networks/lora.py names a module prefix + its path in the UNet it trains), never
# read from the code under test.

ATTENTION = [f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]

# The fields that shape the module tree, from each model's unet/config.json (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0).
REAL_UNETS = {
    "sd15": dict(
        block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    ),
    "sd2": dict(
        block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20, 20],
        cross_attention_dim=1024, use_linear_projection=True,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    ),
    "sdxl": dict(
        block_out_channels=[320, 640, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
        transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    ),
}


def kohya_unet_names(config, sgm: bool, linear: list[str], conv: bool = False, projections: bool = False) -> set[str]:
    """kohya's UNet module names: diffusers' module paths for SD 1.x/2.x; with `sgm` (SDXL, kohya's
    sdxl_original_unet.py) SGM's numbering, where conv_in is input_blocks.0 and each level's layers, then
    its downsampler, follow; the middle block is resnet 0, attention 1, resnet 2; each output level has one
    layer more, its upsampler after the attention (.2) or, with none, after the resnet (.1).

    linear: the modules of every transformer block; projections: each transformer's proj_in / proj_out
    (kohya's default trains them); conv: LoCon's ResNet convolutions (the 1x1 shortcut only where the
    channels change) and the down/up-sampling convolutions."""
    channels, per_block, levels = config["block_out_channels"], config["layers_per_block"], len(config["block_out_channels"])
    depths = config.get("transformer_layers_per_block", 1)
    depths = [depths] * levels if isinstance(depths, int) else depths
    span = per_block + 1
    resnet_convs = ["in_layers.2", "out_layers.3", "skip_connection"] if sgm else ["conv1", "conv2", "conv_shortcut"]
    names = []

    def transformer(path, depth):
        names.extend(f"{path}.transformer_blocks.{block}.{module}" for block in range(depth) for module in linear)
        names.extend([f"{path}.proj_in", f"{path}.proj_out"] if projections else [])

    def resnet(path, shortcut):
        names.extend(f"{path}.{name}" for name in resnet_convs[: 3 if shortcut else 2] if conv)

    for level, kind in enumerate(config["down_block_types"]):
        for layer in range(per_block):
            index = span * level + layer + 1
            in_channels = channels[max(level - 1, 0)] if layer == 0 else channels[level]
            resnet(f"input_blocks.{index}.0" if sgm else f"down_blocks.{level}.resnets.{layer}", in_channels != channels[level])
            if "CrossAttn" in kind:
                transformer(f"input_blocks.{index}.1" if sgm else f"down_blocks.{level}.attentions.{layer}", depths[level])
        if conv and level < levels - 1:
            names.append(f"input_blocks.{span * (level + 1)}.0.op" if sgm else f"down_blocks.{level}.downsamplers.0.conv")
    resnet("middle_block.0" if sgm else "mid_block.resnets.0", False)
    transformer("middle_block.1" if sgm else "mid_block.attentions.0", depths[-1])
    resnet("middle_block.2" if sgm else "mid_block.resnets.1", False)
    for level, kind in enumerate(config["up_block_types"]):
        attention = "CrossAttn" in kind
        for layer in range(per_block + 1):
            index = span * level + layer
            # Every output resnet takes the skip connection concatenated in: its channels always change.
            resnet(f"output_blocks.{index}.0" if sgm else f"up_blocks.{level}.resnets.{layer}", True)
            if attention:
                transformer(f"output_blocks.{index}.1" if sgm else f"up_blocks.{level}.attentions.{layer}", depths[::-1][level])
        if conv and level < levels - 1:
            names.append(f"output_blocks.{span * level + per_block}.{2 if attention else 1}.conv" if sgm else f"up_blocks.{level}.upsamplers.0.conv")
    return {f"lora_unet_{name.replace('.', '_')}" for name in names}


def kohya_text_encoder_names(prefix: str, encoder) -> set[str]:
    return {
        f"{prefix}_text_model_encoder_layers_{layer}_self_attn_{projection}"
        for layer in range(encoder.config.num_hidden_layers) for projection in TEXT_ENCODER
    }


def lora_module_paths(model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


# Names written out by hand (kohya's rule on each published layout; the SDXL ones as sdxl_original_unet.py
# and the bug report spell them), a check on kohya_unet_names itself.
REAL_NAMES = {
    "sd15": [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "lora_unet_mid_block_resnets_1_conv2",
    ],
    "sd2": ["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0", "lora_unet_down_blocks_2_downsamplers_0_conv"],
    "sdxl": [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
        "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_out_0", "lora_unet_input_blocks_3_0_op",
        "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv",
        "lora_unet_middle_block_2_out_layers_3", "lora_unet_output_blocks_8_0_in_layers_2",
    ],
}


@pytest.mark.parametrize(
    ("family", "kohya_default", "kiln_linear", "conv"),
    [("sd15", 192, 160, 64), ("sd2", 192, 160, 64), ("sdxl", 722, 700, 49)],
)
def test_real_size_unet_modules_get_the_names_kohya_writes(family, kohya_default, kiln_linear, conv):
    from diffusers import UNet2DConditionModel

    config = REAL_UNETS[family]
    with torch.device("meta"):  # the real architecture, no weights
        unet = UNet2DConditionModel(**config)
    add_lora(unet, dim=16, alpha=16, dropout=0.0, targets=UNET_ATTENTION + UNET_FEED_FORWARD, conv_dim=8, conv_alpha=4)
    names = {kohya_module_name("lora_unet", path, unet) for path in lora_module_paths(unet)}
    sgm = family == "sdxl"
    linear = kohya_unet_names(config, sgm, ATTENTION + FEED_FORWARD)
    convolutions = kohya_unet_names(config, sgm, [], conv=True)
    assert len(linear) == kiln_linear and len(convolutions) == conv
    assert names == linear | convolutions
    assert set(REAL_NAMES[family]) <= names
    # kohya's default network (attention, feed-forward, proj_in and proj_out): 192 modules for SD 1.x/2.x,
    # 722 for SDXL. Kiln trains all but the projections, under the same names.
    default = kohya_unet_names(config, sgm, ATTENTION + FEED_FORWARD, projections=True)
    assert len(default) == kohya_default and linear <= default
    assert all(name.endswith(("_proj_in", "_proj_out")) for name in default - linear)


def family_pipeline(family: str):
    """The tiny preset of each family. SD 2.x differs from 1.x, where a LoRA sees it, only in the UNet's linear
    proj_in / proj_out and per-level head counts: tiny-sd15's pipeline with such a UNet stands for it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if family == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(preset_dir("tiny-sdxl"))
    extra = {}
    if family == "sd2":
        config = UNet2DConditionModel.load_config(preset_dir("tiny-sd15"), subfolder="unet")
        torch.manual_seed(0)  # the same UNet weights on every call
        extra["unet"] = UNet2DConditionModel.from_config({**config, "use_linear_projection": True, "attention_head_dim": (2, 4)})
    return StableDiffusionPipeline.from_pretrained(preset_dir("tiny-sd15"), safety_checker=None, **extra)


def family_output(pipeline) -> torch.Tensor:
    """The UNet output for a fixed prompt through every text encoder (so text-encoder LoRAs count too)."""
    if not hasattr(pipeline, "text_encoder_2"):
        return unet_output(pipeline)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        states, _, pooled, _ = pipeline.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
        conditions = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
        return pipeline.unet(latents, torch.tensor([500]), encoder_hidden_states=states, added_cond_kwargs=conditions).sample


def trained_network(family: str, locon: bool):
    """A pipeline with a LoRA whose weights are random (lora_up starts at zero): attention and text encoders,
    or attention, feed-forward and LoCon convolutions. Returns it and its (kohya prefix, model) networks."""
    pipeline = family_pipeline(family)
    params = add_lora(
        pipeline.unet, dim=4, alpha=2, dropout=0.0, targets=UNET_ATTENTION + (UNET_FEED_FORWARD if locon else []),
        conv_dim=2 if locon else None, conv_alpha=1,
    )
    networks = [("lora_unet", pipeline.unet)]
    if not locon:
        encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if family == "sdxl" else [])
        prefixes = ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]
        for prefix, encoder in zip(prefixes, encoders, strict=True):
            params += add_lora(encoder, dim=4, alpha=2, dropout=0.0, targets=TEXT_ENCODER)
            networks.append((prefix, encoder))
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn_like(param) * 0.3)
    return pipeline, networks


@pytest.mark.parametrize("locon", [False, True], ids=["attention+text_encoders", "attention+ff+locon"])
@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_kohya_file_has_kohyas_names_and_diffusers_applies_every_module(family, locon, tmp_path):
    trained, networks = trained_network(family, locon)
    state = kohya_state_dict(networks, alpha=2)
    modules = {key.split(".")[0] for key in state}
    expected = kohya_unet_names(trained.unet.config, family == "sdxl", ATTENTION + (FEED_FORWARD if locon else []), conv=locon)
    for prefix, encoder in networks[1:]:
        expected |= kohya_text_encoder_names(prefix, encoder)
    assert modules == expected
    path = tmp_path / "lora.safetensors"
    save_kohya_lora(path, state, {})

    base = family_pipeline(family)
    before = family_output(base)
    base.load_lora_weights(str(path))
    # diffusers converted every module of the file and found its layer: one LoRA layer each, none dropped.
    components = {"lora_unet": base.unet, "lora_te": base.text_encoder, "lora_te1": base.text_encoder, "lora_te2": getattr(base, "text_encoder_2", None)}
    for prefix, _ in networks:
        assert len(lora_module_paths(components[prefix])) == sum(name.startswith(f"{prefix}_") for name in modules), prefix
    after = family_output(base)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, family_output(trained), atol=2e-2, rtol=2e-2)  # fp16 file, same network


def test_sdxl_lora_in_the_earlier_diffusers_path_layout_still_loads(tmp_path):
    """SDXL LoRAs Kiln wrote before it took kohya's names (`lora_unet_down_blocks_1_...`: diffusers' module
    paths) still load where users load them. Kiln itself reads no LoRA file back: checkpoints and the EMA file
    store the trained tensors by position."""
    trained, networks = trained_network("sdxl", locon=True)
    old = {}
    for path in lora_module_paths(trained.unet):
        layer = trained.unet.get_submodule(path)
        name = f"lora_unet_{path.replace('.', '_')}"
        old[f"{name}.lora_down.weight"] = layer.lora_A["kiln"].weight.detach().half().contiguous()
        old[f"{name}.lora_up.weight"] = layer.lora_B["kiln"].weight.detach().half().contiguous()
        old[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha["kiln"]), dtype=torch.float16)
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.alpha" in old
    save_file(old, str(tmp_path / "old.safetensors"))
    base = family_pipeline("sdxl")
    base.load_lora_weights(str(tmp_path / "old.safetensors"))
    assert len(lora_module_paths(base.unet)) == len(lora_module_paths(trained.unet))
    torch.testing.assert_close(family_output(base), family_output(trained), atol=2e-2, rtol=2e-2)
