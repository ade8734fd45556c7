"""The Stable Diffusion parts a trainer needs: UNet, text encoders, tokenizers, noise scheduler.

The VAE is not loaded: latents are cached. Its scaling factor is read from its config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import KilnError
from pipeline.inference import resolve_model


@dataclass
class SDComponents:
    family: str  # "sd" (1.x / 2.x) or "sdxl"
    unet: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    scaling_factor: float
    folder: Path

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def load_components(spec: str, key: str = "model.base") -> SDComponents:
    """Load from a diffusers folder (or a preset / cached hub id that resolves to one)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    model = resolve_model(spec, key)
    folder = model.folder
    if folder.is_file() or not (folder / "model_index.json").is_file():
        raise KilnError(
            f"{key}: {folder} is not a diffusers model folder (no model_index.json). Training loads a diffusers "
            "folder, a preset (tiny-sd15, tiny-sdxl) or a cached hub id; convert a single-file checkpoint with "
            "diffusers first, or point model.base at the folder."
        )
    xl = (folder / "text_encoder_2").is_dir()
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")]
        tokenizers = [AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")]
        if xl:
            encoders.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"))
            tokenizers.append(AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
        # Training always uses the DDPM forward process with the base's betas and prediction type.
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise KilnError(f"{key}: cannot load the model from {folder} ({exc.__class__.__name__}: {exc})") from None
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    for encoder in encoders:
        encoder.requires_grad_(False)
    return SDComponents("sdxl" if xl else "sd", unet, encoders, tokenizers, scheduler, float(vae_config["scaling_factor"]), folder)


def encode_text(components: SDComponents, captions: list[str], device: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """encoder_hidden_states (B, 77, D), and for SDXL the pooled embedding of the second encoder.

    SD 1.x/2.x take the last hidden state; SDXL concatenates both encoders' penultimate hidden states,
    as its pipeline does. An empty caption (caption dropout) is encoded like any other text.
    """
    states, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
        length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
        ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        ids = ids.to(device)
        if components.family == "sdxl":
            output = encoder(ids, output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # the projection model's text_embeds (used from the second encoder)
        else:
            states.append(encoder(ids)[0])
    return torch.cat(states, dim=-1), pooled


def set_attention(unet: Any, attn_type: str) -> None:
    """sdp: torch's fused attention (diffusers' default processor); xformers; or sliced attention."""
    if attn_type == "sdp":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    elif attn_type == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise KilnError("train.attn_type: xformers is not installed; pip install xformers, or use sdp") from None
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attention_slice("auto")
