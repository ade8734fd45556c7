import torch
from safetensors import safe_open

from pipeline.lora import TEXT_ENCODER, UNET_ATTENTION, add_lora, kohya_state_dict, save_kohya_lora
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
