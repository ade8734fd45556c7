"""Sample images during training, with the diffusers pipeline and the current weights.

The Sampler holds what drawing needs across a run, above all the VAE the latents were encoded with,
loaded only when first asked for (a LoRA run that draws no samples never loads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.models import find_vae
from pipeline.params import Params, SamplePrompt
from pipeline.sd import SDComponents


def render(
    components: SDComponents, unet: Any, vae: Any, prompts: list[SamplePrompt], device: Any, clip_skip: int = 1,
    zero_terminal_snr: bool = False,
) -> list[Image.Image]:
    """One image per prompt, each from its own seed, with an Euler sampler on the base's schedule.

    clip_skip is the trainer's (1 = last layer); diffusers counts the layers skipped. A zero-terminal-SNR
    model samples with the rescaled betas from the last timestep ("trailing"), as Lin et al. prescribe.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_terminal_snr else {}
    scheduler = EulerDiscreteScheduler.from_config(components.noise_scheduler.config, **extra)
    modules: dict[str, Any] = {
        "vae": vae.to(device), "unet": unet, "scheduler": scheduler,
        "text_encoder": components.text_encoders[0], "tokenizer": components.tokenizers[0],
    }
    if components.family == "sdxl":
        modules.update(text_encoder_2=components.text_encoders[1], tokenizer_2=components.tokenizers[1])
        pipeline = StableDiffusionXLPipeline(**modules)
    else:
        pipeline = StableDiffusionPipeline(**modules, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    images = []
    try:
        with torch.inference_mode():
            for prompt in prompts:
                generator = torch.Generator("cpu").manual_seed(prompt.seed)
                result = pipeline(
                    prompt.prompt, negative_prompt=prompt.negative_prompt or None, num_inference_steps=prompt.steps,
                    guidance_scale=prompt.cfg, width=prompt.width, height=prompt.height, generator=generator,
                    clip_skip=clip_skip - 1 or None,
                )
                images.append(result.images[0])
    finally:
        unet.train(was_training)
    return images


def save_grid(images: list[Image.Image], path: Path) -> Image.Image:
    """The images side by side (top-aligned), as one PNG."""
    width = sum(image.width for image in images)
    height = max(image.height for image in images)
    grid = Image.new("RGB", (width, height), (0, 0, 0))
    left = 0
    for image in images:
        grid.paste(image, (left, 0))
        left += image.width
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


class Sampler:
    """Draws train.sample_prompts into samples/<name>.png and TensorBoard, with the trained weights, the EMA
    weights, or both (ema_sample_nonema_model / ema_sample_ema_model; by default the EMA's when it is on)."""

    def __init__(self, components: SDComponents, params: Params, folder: Path, device: Any, logger: Any, enabled: bool, ema_on: bool):
        cfg = params.train
        self.components, self.params, self.folder, self.device, self.logger = components, params, folder, device, logger
        self.enabled = enabled and bool(cfg.sample_prompts)  # the main process draws
        self.plain = cfg.ema_sample_nonema_model if cfg.ema_sample_nonema_model is not None else not ema_on
        self.with_ema = cfg.ema_sample_ema_model if cfg.ema_sample_ema_model is not None else ema_on
        self._vae: Any = None

    @property
    def vae(self) -> Any:
        """The VAE the latents were encoded with (cache.vae, else the base's), loaded on first use."""
        if self._vae is None:
            model, cache = self.params.model, self.params.cache
            if self.components.pipeline is not None and not cache.vae:
                self._vae = self.components.pipeline.vae  # a single-file base: its own VAE
            else:
                key = "cache.vae" if cache.vae else "model.base"
                self._vae = find_vae(cache.vae or model.base, key, model.config).load().vae
        return self._vae

    def draw(self, name: str, global_step: int, unet: Any, ema: Any, clip_skip: int) -> None:
        if not self.enabled:
            return
        if self.plain:
            self._draw(name, "samples", global_step, unet, clip_skip)
        if self.with_ema and ema is not None:
            with ema.swapped():
                self._draw(f"{name}-ema", "samples_ema", global_step, unet, clip_skip)

    def _draw(self, file_name: str, tag: str, global_step: int, unet: Any, clip_skip: int) -> None:
        cfg = self.params.train
        images = render(self.components, unet, self.vae, cfg.sample_prompts, self.device, clip_skip, cfg.zero_terminal_snr)
        grid = save_grid(images, self.folder / f"{file_name}.png")
        self.logger.image(global_step, tag, grid)
