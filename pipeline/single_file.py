"""Diffusers weights to the original Stable Diffusion single-file layout that A1111 and ComfyUI load.

diffusers reads these files (`from_single_file`) but has no writer in the library, so Kiln maps the keys
back itself: the UNet to `model.diffusion_model.*` (LDM's input/middle/output blocks), the VAE to
`first_stage_model.*`, and the text encoders to the prefixes of each family:

- SD 1.x: `cond_stage_model.transformer.*` (transformers' CLIP names, unchanged);
- SD 2.x: `cond_stage_model.model.*` (OpenCLIP names, q/k/v fused into in_proj);
- SDXL: `conditioner.embedders.0.transformer.*` (CLIP) and `conditioner.embedders.1.model.*` (OpenCLIP).

The tests prove the mapping by loading the written file back through diffusers' own converter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import KilnError
from pipeline.sd import model_version
from pipeline.weights import canonical_clip_keys, save_safetensors

RESNET_NAMES = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}


def _rename_resnet(rest: str) -> str:
    name, dot, tail = rest.partition(".")
    return f"{RESNET_NAMES.get(name, name)}{dot}{tail}"


def unet_key_to_original(key: str, config: Any) -> str:
    """One UNet2DConditionModel key to its LDM name under `model.diffusion_model.` (`input_blocks` /
    `middle_block` / `output_blocks`). kohya's SDXL LoRA names are these too (lora.kohya_module_name).

    A down block holds `layers_per_block` resnets (+ attentions) and a downsampler; LDM numbers them
    consecutively after `input_blocks.0` (conv_in). An up block holds one resnet more; its upsampler
    sits after the attention when the block has one (`.2`), else after the resnet (`.1`).
    """
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise KilnError(f"unet layers_per_block={per_block!r}: only the Stable Diffusion layout (one int) converts to a single file")
    up_has_attention = ["CrossAttn" in name for name in config["up_block_types"]]
    span = per_block + 1
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = span * block + layer + 1
        return f"input_blocks.{index}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{span * (int(match[1]) + 1)}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_rename_resnet(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = span * block + layer
        return f"output_blocks.{index}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(match[1])
        return f"output_blocks.{span * block + per_block}.{2 if up_has_attention[block] else 1}.conv.{match[2]}"
    prefix, _, tail = key.rpartition(".")
    if prefix not in UNET_TOP:
        raise KilnError(f"unet: no single-file name for '{key}' (not a Stable Diffusion UNet?)")
    return f"{UNET_TOP[prefix]}.{tail}"


def unet_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel keys to LDM's `input_blocks` / `middle_block` / `output_blocks` keys."""
    return {f"model.diffusion_model.{unet_key_to_original(key, config)}": value for key, value in state.items()}


def vae_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """AutoencoderKL keys to LDM's `encoder.down.N.block.M` / `decoder.up.N...` keys.

    The decoder's up levels are numbered in reverse in LDM, and its mid-block attention is made of
    1x1 convolutions where diffusers has linear layers.
    """
    levels = len(config["up_block_types"])
    converted = {}
    for key, value in state.items():
        new = key
        if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            part, name, kind = match[1], match[2], match[3]
            new = f"{part}.mid.attn_1.{VAE_ATTENTION_NAMES[name]}.{kind}"
            if kind == "weight" and name != "group_norm":
                value = value.reshape(*value.shape, 1, 1)
        elif match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}"
        elif match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{match[1]}.block.{match[2]}.{match[3]}"
        elif match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{match[1]}.downsample.{match[2]}"
        elif match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(match[1])}.block.{match[2]}.{match[3]}"
        elif match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(match[1])}.upsample.{match[2]}"
        new = new.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        converted[f"first_stage_model.{new}"] = value
    return converted


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers' CLIP text model: the same names under the checkpoint's prefix."""
    return {f"{prefix}{key}": value for key, value in state.items()}


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers' CLIP names to OpenCLIP's: fused in_proj, resblocks, ln_final, a transposed projection."""
    converted: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "text_model.embeddings.token_embedding.weight":
            converted[f"{prefix}token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            converted[f"{prefix}positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            converted[f"{prefix}ln_final.{key.rsplit('.', 1)[1]}"] = value
        elif key == "text_projection.weight":
            converted[f"{prefix}text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P
        elif match := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault((int(match[1]), match[3]), {})[match[2]] = value
        elif match := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            converted[f"{prefix}transformer.resblocks.{match[1]}.{OPEN_CLIP_LAYER_NAMES[match[2]]}.{match[3]}"] = value
        elif key != "text_model.embeddings.position_ids":
            raise KilnError(f"text encoder: no OpenCLIP name for '{key}'")
    for (layer, kind), parts in fused.items():
        converted[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def original_state_dict(family: str, unet: Any, vae: Any, text_encoders: list[Any]) -> dict[str, torch.Tensor]:
    """The whole checkpoint in the original layout, for SD 1.x, SD 2.x (OpenCLIP ViT-H) or SDXL."""
    def weights(module: Any) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}

    state = unet_to_original(weights(unet), unet.config)
    state.update(vae_to_original(weights(vae), vae.config))
    encoders: list[tuple[Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]], str]]
    if family == "sdxl":
        encoders = [(clip_to_original, "conditioner.embedders.0.transformer."), (open_clip_to_original, "conditioner.embedders.1.model.")]
    elif model_version(family, text_encoders) == "sd2":  # SD 2.x's OpenCLIP ViT-H text tower
        encoders = [(open_clip_to_original, "cond_stage_model.model.")]
    else:
        encoders = [(clip_to_original, "cond_stage_model.transformer.")]
    for (convert, prefix), encoder in zip(encoders, text_encoders, strict=True):
        state.update(convert(canonical_clip_keys(weights(encoder)), prefix))
    return state


def save_single_file(path: Path, family: str, unet: Any, vae: Any, text_encoders: list[Any], metadata: dict[str, str], dtype: torch.dtype | None = None) -> Path:
    """Write the checkpoint atomically (tmp, then rename), optionally cast (fp16 halves the size)."""
    state = original_state_dict(family, unet, vae, text_encoders)
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    try:
        return save_safetensors(state, path, metadata)
    except OSError as exc:
        raise KilnError(f"{path}: cannot write the checkpoint ({exc.strerror or exc})") from None
