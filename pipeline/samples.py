"""Sample images during training, with the diffusers pipeline and the current weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.params import SamplePrompt
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
