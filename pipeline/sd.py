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
from pipeline.models import pickle_error


@dataclass
class SDComponents:
    family: str  # "sd" (1.x / 2.x) or "sdxl"
    unet: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    scaling_factor: float
    folder: Path  # the base: a diffusers folder, or a single checkpoint file
    pipeline: Any = None  # for a single-file base, the pipeline it was read into (it holds the VAE)
    # SDXL's pipelines encode an empty prompt as zeros (force_zeros_for_empty_prompt), so its
    # unconditional embedding, which caption dropout trains, is zeros too.
    zero_empty_prompt: bool = False

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def version(self) -> str:
        return model_version(self.family, self.text_encoders)


def model_version(family: str, text_encoders: list[Any]) -> str:
    """sd1, sd2 or sdxl. SD 2.x is the "sd" family with OpenCLIP ViT-H's 1024-wide text tower (kohya's ss_v2)."""
    if family == "sdxl":
        return "sdxl"
    return "sd2" if text_encoders[0].config.hidden_size == 1024 else "sd1"


def single_file_family(path: Path) -> str:
    """sdxl when the checkpoint holds SDXL's second text encoder, else sd; read from the key names only."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        keys = list(checkpoint.get("state_dict", checkpoint))
    return "sdxl" if any(key.startswith("conditioner.embedders.1.") for key in keys) else "sd"


def _load_single_file(path: Path, config: str | None, key: str) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        family = single_file_family(path)
    except Exception as exc:  # a truncated or foreign file: say which, without a traceback
        raise pickle_error(key, path, exc) or KilnError(f"{key}: {path} is not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {"config": str(resolve_model(config, "model.config").folder)} if config else {}
    try:
        return cls.from_single_file(str(path), **extra)
    except Exception as exc:  # diffusers raises OSError, ValueError or its own errors for missing configs
        hint = (
            f"model.config={config} must be a diffusers folder of the same architecture"
            if config else
            "diffusers needs the architecture's configs and tokenizers: set model.config to a local diffusers "
            "folder of the same architecture (a downloaded base model; its weights are not read)"
        )
        raise pickle_error(key, path, exc) or KilnError(f"{key}: cannot load the {family} checkpoint {path}: {hint} ({exc.__class__.__name__}: {exc})") from None


def load_components(spec: str, key: str = "model.base", config: str | None = None) -> SDComponents:
    """Load from a diffusers folder, a single-file checkpoint (with `config`, model.config), a preset
    or a cached hub id."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    model = resolve_model(spec, key)
    folder = model.folder
    if folder.is_file():
        pipeline = _load_single_file(folder, config, key)
        xl = hasattr(pipeline, "text_encoder_2")
        encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if xl else [])
        tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if xl else [])
        for encoder in encoders:
            encoder.requires_grad_(False)
        scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        return SDComponents(
            "sdxl" if xl else "sd", pipeline.unet, encoders, tokenizers, scheduler,
            float(pipeline.vae.config.scaling_factor), folder, pipeline,
            xl and bool(pipeline.config.get("force_zeros_for_empty_prompt", True)),
        )
    if not (folder / "model_index.json").is_file():
        raise KilnError(
            f"{key}: {folder} is not a diffusers model folder (no model_index.json). Point {key} at a diffusers "
            "folder, a single .safetensors/.ckpt checkpoint, a preset (tiny-sd15, tiny-sdxl) or a cached hub id."
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
    index = json.loads((folder / "model_index.json").read_text())
    for encoder in encoders:
        encoder.requires_grad_(False)
    return SDComponents(
        "sdxl" if xl else "sd", unet, encoders, tokenizers, scheduler, float(vae_config["scaling_factor"]), folder,
        zero_empty_prompt=xl and bool(index.get("force_zeros_for_empty_prompt", True)),
    )


def encode_text(
    components: SDComponents, captions: list[str], device: Any, clip_skip: int = 1, perturbation: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """encoder_hidden_states (B, 77, D), and for SDXL the pooled embedding of the second encoder.

    SD 1.x/2.x take the last hidden state, or with clip_skip N the N-th from the end passed through the
    final layer norm, as A1111 does (SD 2.x counts from the layer diffusers' encoder already ends at).
    SDXL concatenates both encoders' penultimate hidden states, as its pipeline does (clip_skip counts
    back from there), and encodes an empty caption as zeros. `perturbation` γ adds N(0, γ²/D) noise to
    the embeddings (embedding_perturbation, arXiv 2405.20494).
    """
    hidden_states, pooled = text_embeddings(components, captions, device, clip_skip)
    return perturb(hidden_states, perturbation, generator), pooled


def perturb(hidden_states: torch.Tensor, perturbation: float, generator: torch.Generator | None) -> torch.Tensor:
    """embedding_perturbation: N(0, γ²/D) noise added to the text embeddings, drawn from the batch's generator."""
    if perturbation <= 0:
        return hidden_states
    noise = torch.randn(hidden_states.shape, generator=generator, dtype=torch.float32).to(hidden_states)
    return hidden_states + noise * (perturbation / hidden_states.shape[-1] ** 0.5)


def text_embeddings(
    components: SDComponents, captions: list[str], device: Any, clip_skip: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """encode_text without the perturbation: a function of each caption alone (what TextEmbeddingCache keeps).
    Each encoder runs where it is (the trainer moves them off the GPU once their outputs are cached); the
    embeddings are returned on `device`."""
    states, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
        length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
        ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        ids = ids.to(encoder.device)
        if components.family == "sdxl":
            output = encoder(ids, output_hidden_states=True)
            states.append(output.hidden_states[-(clip_skip + 1)])
            pooled = output[0]  # the projection model's text_embeds (used from the second encoder)
        elif clip_skip == 1:
            states.append(encoder(ids)[0])
        else:
            hidden = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
            # transformers 5 flattened CLIPTextModel; older versions keep the layers under text_model.
            states.append(getattr(encoder, "text_model", encoder).final_layer_norm(hidden))
    hidden_states = torch.cat(states, dim=-1)
    if components.zero_empty_prompt:
        empty = torch.tensor([not caption.strip() for caption in captions], device=hidden_states.device)
        if empty.any():
            hidden_states = torch.where(empty.view(-1, 1, 1), torch.zeros_like(hidden_states), hidden_states)
            pooled = torch.where(empty.view(-1, 1), torch.zeros_like(pooled), pooled)
    return hidden_states.to(device), pooled.to(device) if pooled is not None else None


class TextEmbeddingCache:
    """Frozen text encoders' outputs per caption text (kohya's `cache_text_encoder_outputs`, SimpleTuner's
    text-embed cache): a caption is encoded once, then read back. Kept on the CPU in the encoders' dtype,
    each batch's rows moved to the device: SD 1.5 holds 77 x 768 float32 (236 KB) per caption, SDXL
    77 x 2048 plus its pooled 1280 (636 KB). A caption's embedding depends on that caption alone (the
    tokens are padded to a fixed length, the attention is causal), so reading it back changes no result
    beyond float rounding (a caption encoded in another batch may differ in its last bit).

    Exact resume: `warm` encodes the plan's captions in sorted chunks, the same chunks in every run of the
    same plan, and a caption first seen in a batch (an EveryDream2 image's own shuffle_tags) is encoded
    alone. So a resumed run reads the very rows the uninterrupted one read.
    """

    def __init__(self, components: SDComponents, device: Any, clip_skip: int, batch_size: int = 64):
        self.components, self.device, self.clip_skip, self.batch_size = components, device, clip_skip, batch_size
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def reset(self, clip_skip: int) -> None:
        """Forget every caption: another layer (load_settings_every_epoch may change clip_skip) encodes anew."""
        self.clip_skip, self.rows = clip_skip, {}

    def warm(self, captions: list[str]) -> int:
        """Encode the captions not yet held, batch_size at a time; returns how many were new."""
        missing = [caption for caption in dict.fromkeys(captions) if caption not in self.rows]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            with torch.no_grad():
                states, pooled = text_embeddings(self.components, chunk, "cpu", self.clip_skip)
            for index, caption in enumerate(chunk):
                self.rows[caption] = (states[index], pooled[index] if pooled is not None else None)
        return len(missing)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        for caption in dict.fromkeys(captions):
            if caption not in self.rows:
                self.warm([caption])  # alone: its row must not depend on when it was first seen
        rows = [self.rows[caption] for caption in captions]
        states = torch.stack([state for state, _ in rows]).to(self.device, non_blocking=True)
        if rows[0][1] is None:
            return states, None
        return states, torch.stack([pooled for _, pooled in rows]).to(self.device, non_blocking=True)


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
