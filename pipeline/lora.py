"""LoRA networks through peft, saved in the kohya key format that A1111, ComfyUI and diffusers read.

A kohya key is `lora_unet_` / `lora_te_` (SDXL: `lora_te1_`, `lora_te2_`) plus the module path with dots
turned into underscores, then `.lora_down.weight`, `.lora_up.weight` and `.alpha`. The strength is
alpha / dim, as in kohya's networks.lora.

The module path is the one in the model kohya trains. For SD 1.x/2.x that is diffusers' own
(`lora_unet_down_blocks_0_attentions_0_...`); for SDXL it is the original SGM layout
(`lora_unet_input_blocks_4_1_...`, `middle_block`, `output_blocks`), because sdxl_train_network trains
its own copy of that UNet. kohya's sdxl_merge_lora.py and A1111 look SDXL modules up by those names only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.single_file import unet_key_to_original
from pipeline.tables import honour_umask
from pipeline.weights import canonical_clip_name, canonical_header, save_safetensors

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER = "kiln"


# LoCon: the ResNet convolutions and the down/up-sampling convolutions, as kohya's LoCon targets them.
CONV_PATTERN = r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut)|(downsamplers|upsamplers)\.\d+\.conv)"


def add_lora(
    model: Any, dim: int, alpha: float, dropout: float, targets: list[str],
    conv_dim: int | None = None, conv_alpha: float | None = None,
) -> list[torch.nn.Parameter]:
    """Inject a peft LoRA adapter (with conv_dim, also on the convolutions: LoCon); returns its
    trainable parameters (everything else stays frozen)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    settings: dict[str, Any] = {"target_modules": targets}
    if conv_dim:
        linear = "|".join(target.replace(".", "\\.") for target in targets)
        settings = {
            "target_modules": rf"(.*\.({linear}))|{CONV_PATTERN}",
            # Convolutions get their own rank and alpha; peft matches these keys against module paths.
            "rank_pattern": {CONV_PATTERN: conv_dim},
            "alpha_pattern": {CONV_PATTERN: conv_alpha if conv_alpha is not None else conv_dim},
        }
    config = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", **settings)
    # peft's own injection, not the models' add_adapter wrappers: those pin peft versions that lag the
    # libraries around them (transformers 5 asks for a peft newer than the registry has).
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = [param for name, param in model.named_parameters() if "lora_" in name]
    for param in params:
        param.requires_grad_(True)
    return params


def _module_paths(model: Any) -> dict[str, Any]:
    """peft LoRA layers by their module path in the base model."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def kohya_module_name(prefix: str, path: str, model: Any) -> str:
    """kohya's name for the module at `path` (a module path in `model`, diffusers' or transformers' names)."""
    if prefix == "lora_unet" and model.config.get("addition_embed_type") == "text_time":
        # SDXL's UNet (text_time conditioning): kohya names it as the single file does. A module's name
        # there is its weight's, less `.weight`.
        path = unet_key_to_original(f"{path}.weight", model.config).removesuffix(".weight")
    elif prefix.startswith("lora_te"):
        path = canonical_clip_name(path)  # kohya's keys, and every tool that reads them, keep text_model_
    return f"{prefix}_{path.replace('.', '_')}"


def kohya_state_dict(networks: list[tuple[str, Any]], alpha: float, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """networks: (kohya prefix, model with a LoRA adapter), e.g. ("lora_unet", unet), ("lora_te", text_encoder)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, model in networks:
        for path, layer in sorted(_module_paths(model).items()):
            name = kohya_module_name(prefix, path, model)
            down = layer.lora_A[ADAPTER].weight
            up = layer.lora_B[ADAPTER].weight
            state[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
            state[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
            # Each layer's own alpha: LoCon convolutions have conv_alpha.
            state[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha.get(ADAPTER, alpha)), dtype=dtype)
    return state


def save_kohya_lora(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write atomically; every metadata value is a string, as safetensors and kohya require."""
    strings = {key: value if isinstance(value, str) else json.dumps(value, sort_keys=True) for key, value in metadata.items()}
    save_safetensors(state, path, strings)


def save_diffusers_lora(folder: Path, unet: Any, text_encoders: list[Any], xl: bool) -> None:
    """The same network in diffusers' own LoRA format (pytorch_lora_weights.safetensors)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import get_peft_model_state_dict

    def metadata(model: Any) -> dict[str, Any]:
        # Without the adapter's config diffusers would assume alpha = rank and load the wrong strength.
        config = model.peft_config[ADAPTER].to_dict()
        return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}

    layers = {
        "unet_lora_layers": get_peft_model_state_dict(unet, adapter_name=ADAPTER),
        "unet_lora_adapter_metadata": metadata(unet),
    }
    for name, encoder in zip(["text_encoder", "text_encoder_2"], text_encoders, strict=False):
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(encoder, adapter_name=ADAPTER)
        layers[f"{name}_lora_adapter_metadata"] = metadata(encoder)
    pipeline = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipeline.save_lora_weights(str(folder), safe_serialization=True, **layers)
    # diffusers writes through safetensors' own save_file: give its file what every Kiln file has, a sorted
    # header (the same bytes for the same weights) and the user's umask (not safetensors' 0600).
    saved = folder / "pytorch_lora_weights.safetensors"
    canonical_header(saved)
    honour_umask(saved)
