"""Sample images during training, with the diffusers pipeline and the current weights.

The Sampler holds what drawing needs across a run, above all the VAE the latents were encoded with,
loaded only when first asked for (a LoRA run that draws no samples never loads it). Its prompts are
train.sample_prompts, a list or a prompt file (pipeline.prompts); its sampler is train.sample_sampler,
unless a prompt names its own; each grid labels every image with its prompt, seed, CFG and step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import KilnError
from pipeline.models import find_vae
from pipeline.params import Params, SamplePrompt, TrainParams
from pipeline.prompts import PromptFile, load_sample_prompts
from pipeline.sd import SDComponents, encode_text

log = logging.getLogger(__name__)

# kohya's get_my_scheduler (library/train_util.py): the diffusers scheduler each sample_sampler names, and
# its settings. Built from the base's scheduler config (its betas and prediction type), where kohya builds
# SD's default schedule afresh. kohya also turns clip_sample on (DDIM, Heun); Kiln keeps the base's setting,
# off for SD, as diffusers' SD pipelines require (they reset it, with a deprecation warning, when it is on).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers ends the first-order DPM-Solver at sigma_min (it refuses its default, a last step to sigma 0).
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    # lower_order_final: what diffusers switches a final step to sigma 0 to anyway, with a warning at every draw.
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"lower_order_final": True}),
}
# Lin et al. 2023 (2305.08891), Sections 3.1 and 3.3: a zero-terminal-SNR model samples with the rescaled
# betas, from the last timestep ("trailing").
ZERO_TERMINAL_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
# The samplers whose scheduler rescales the betas and keeps the first step finite (alphas_cumprod[-1] =
# 2**-24). DDIM's reaches alphas_cumprod = 0, which only v-prediction survives (epsilon divides by it).
ZERO_SNR_SAMPLERS = ("euler", "euler_a", "dpmsolver", "dpmsolver++")

# transformers logs these two when diffusers' pipelines import its image processors without torchvision
# installed: noise in the middle of the progress bar, about classes a sampler without safety checker never uses.
TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"

LABEL_PADDING = 3  # pixels between a label strip's edge and its text
LABEL_BACKGROUND, LABEL_TEXT = (255, 255, 255), (0, 0, 0)


def scheduler_class(sampler: str) -> Any:
    """The diffusers scheduler class of a kohya sampler name; an error when a library it needs is missing
    (diffusers then exports a placeholder: LMSDiscreteScheduler needs scipy)."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[sampler][0])
    missing = [name for name in getattr(cls, "_backends", []) if importlib.util.find_spec(name) is None]
    if missing:
        raise KilnError(
            f"samples: the {sampler} sampler ({cls.__name__}) needs {', '.join(missing)}, which is not installed; "
            f"pip install {' '.join(missing)}, or choose another sampler"
        )
    return cls


def rescales_to_zero_snr(sampler: str, prediction_type: str) -> bool:
    """The sampler can draw from a zero-terminal-SNR schedule (ZERO_SNR_SAMPLERS; DDIM with v-prediction)."""
    return sampler in ZERO_SNR_SAMPLERS or (sampler == "ddim" and prediction_type == "v_prediction")


def make_scheduler(sampler: str, config: Any, zero_terminal_snr: bool = False) -> Any:
    """The diffusers scheduler of a kohya sampler name, on the schedule of `config` (the base's)."""
    settings = dict(SCHEDULERS[sampler][1])
    if zero_terminal_snr and rescales_to_zero_snr(sampler, config.get("prediction_type", "epsilon")):
        settings.update(ZERO_TERMINAL_SNR)
    return scheduler_class(sampler).from_config(config, **settings)


def samplers_in_use(prompts: list[SamplePrompt], default: str) -> list[str]:
    """The samplers that draw `prompts`: each one's own (a prompt file's), else `default`."""
    return sorted({getattr(prompt, "sampler", None) or default for prompt in prompts})


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_FALLBACK not in record.getMessage()


@contextlib.contextmanager
def quiet_torchvision_fallback() -> Iterator[None]:
    """Drop transformers' "requires torchvision" warnings (and only those) while the block runs."""
    source = logging.getLogger("transformers.utils.import_utils")
    dropping = _DropTorchvisionFallback()
    source.addFilter(dropping)
    try:
        yield
    finally:
        source.removeFilter(dropping)


def render(
    components: SDComponents, unet: Any, vae: Any, prompts: list[SamplePrompt], device: Any, clip_skip: int = 1,
    zero_terminal_snr: bool = False, sampler: str = "euler",
) -> list[Image.Image]:
    """One image per prompt, each from its own seed, with `sampler` (a prompt's own, when it names one) on
    the base's schedule.

    The prompts are encoded as training encodes captions (pipeline.sd.encode_text: clip_skip, SDXL's pooled
    embedding and empty-prompt zeros), and handed to the pipeline as embeddings. A zero-terminal-SNR
    model samples with the rescaled betas from the last timestep ("trailing"), as Lin et al. prescribe, with
    the schedulers that can rescale them; the others keep the base's schedule, as kohya's samplers do.
    """
    with quiet_torchvision_fallback():
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    schedulers: dict[str, Any] = {}

    def scheduler_for(name: str) -> Any:
        if name not in schedulers:
            schedulers[name] = make_scheduler(name, components.noise_scheduler.config, zero_terminal_snr)
        return schedulers[name]

    modules: dict[str, Any] = {
        "vae": vae.to(device), "unet": unet, "scheduler": scheduler_for(sampler),
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
                pipeline.scheduler = scheduler_for(getattr(prompt, "sampler", None) or sampler)
                generator = torch.Generator("cpu").manual_seed(prompt.seed)
                states, pooled = encode_text(components, [prompt.prompt], device, clip_skip)
                negative, negative_pooled = encode_text(components, [prompt.negative_prompt], device, clip_skip)
                extra = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled} if pooled is not None else {}
                latents = pipeline(
                    prompt_embeds=states, negative_prompt_embeds=negative, num_inference_steps=prompt.steps,
                    guidance_scale=prompt.cfg, width=prompt.width, height=prompt.height, generator=generator,
                    output_type="latent", **extra,
                ).images
                images.append(decode(pipeline, vae, latents))
    finally:
        unet.train(was_training)
    return images


def decode(pipeline: Any, vae: Any, latents: torch.Tensor) -> Image.Image:
    """The sampled latents (1, 4, h, w) as an image, decoded as the SD and SDXL pipelines decode them, but
    in the VAE's own dtype (float32) whatever the UNet's: a LoRA's frozen base may be in bfloat16."""
    config = vae.config
    latents = latents.to(vae.dtype)
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    return pipeline.image_processor.postprocess(image, output_type="pil")[0]


def _clip_text(text: str, width: int, draw: ImageDraw.ImageDraw, font: Any) -> str:
    """`text`, cut short with "..." to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def label_lines(prompt: SamplePrompt, global_step: int, width: int, draw: ImageDraw.ImageDraw, font: Any) -> list[str]:
    """The prompt on one line (clipped), then seed, CFG and step, as many to a line as fit `width` pixels."""
    lines = [_clip_text(" ".join(prompt.prompt.split()), width, draw, font)]
    for item in (f"seed {prompt.seed}", f"cfg {prompt.cfg:g}", f"step {global_step}"):
        joined = f"{lines[-1]}  {item}" if len(lines) > 1 else ""
        if joined and draw.textlength(joined, font=font) <= width:
            lines[-1] = joined
        else:
            lines.append(_clip_text(item, width, draw, font))
    return lines


def save_grid(images: list[Image.Image], prompts: list[SamplePrompt], global_step: int, path: Path) -> Image.Image:
    """The images side by side (top-aligned), each labelled in a strip below with its prompt, seed, CFG and
    the global step, as one PNG. Pillow's built-in font and PNG writer: the same inputs give the same bytes."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [label_lines(prompt, global_step, image.width - 2 * LABEL_PADDING, draw, font) for image, prompt in zip(images, prompts, strict=True)]
    line_height = font.getbbox("Ag")[3] + 2
    top = max(image.height for image in images)
    strip = max(len(lines) for lines in labels) * line_height + 2 * LABEL_PADDING
    grid = Image.new("RGB", (sum(image.width for image in images), top + strip), (0, 0, 0))
    draw = ImageDraw.Draw(grid)
    left = 0
    for image, lines in zip(images, labels, strict=True):
        grid.paste(image, (left, 0))
        # One pixel short on the right: a dark line between neighbouring strips.
        draw.rectangle((left, top, left + image.width - 2, top + strip - 1), fill=LABEL_BACKGROUND)
        for row, line in enumerate(lines):
            draw.text((left + LABEL_PADDING, top + LABEL_PADDING + row * line_height), line, fill=LABEL_TEXT, font=font)
        left += image.width
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def resolve_samples(cfg: TrainParams, root: Path = Path(".")) -> PromptFile:
    """train.sample_prompts as prompts (a prompt file read from `root`, the project folder), with the
    cadence: train.sample_every_n_steps / _epochs, else an EveryDream2 file's; both set and different is an error."""
    loaded = load_sample_prompts(cfg.sample_prompts, root)
    every_n_steps = _one_cadence(loaded, "generate_samples_every_n_steps", loaded.every_n_steps, "sample_every_n_steps", cfg.sample_every_n_steps)
    every_n_epochs = _one_cadence(
        loaded, "generate_samples_every_n_epochs", loaded.every_n_epochs, "sample_every_n_epochs", cfg.sample_every_n_epochs,
    )
    return dataclasses.replace(loaded, every_n_steps=every_n_steps, every_n_epochs=every_n_epochs)


def _one_cadence(loaded: PromptFile, file_key: str, in_file: int | None, key: str, in_params: int | None) -> int | None:
    if in_file is not None and in_params is not None and in_file != in_params:
        raise KilnError(f"{loaded.source}: {file_key} is {in_file}, but train.{key} is {in_params}; keep one of them")
    return in_params if in_params is not None else in_file


def check_sample_prompts(cfg: TrainParams, root: Path = Path(".")) -> None:
    """Read train.sample_prompts as the Sampler will, and find each sampler's scheduler, so that a bad prompt
    file or a sampler whose library is missing fails before the models load."""
    for sampler in samplers_in_use(resolve_samples(cfg, root).prompts, cfg.sample_sampler):
        scheduler_class(sampler)


class Sampler:
    """Draws train.sample_prompts into samples/<name>.png and TensorBoard, with the trained weights, the EMA
    weights, or both (ema_sample_nonema_model / ema_sample_ema_model; by default the EMA's when it is on).

    `prompts` is train.sample_prompts resolved (a prompt file read); `every_n_steps` and `every_n_epochs` are
    the cadence (train.sample_every_n_steps / _epochs, else an EveryDream2 prompt file's)."""

    def __init__(
        self, components: SDComponents, params: Params, folder: Path, device: Any, logger: Any, enabled: bool, ema_on: bool,
        root: Path = Path("."),
    ):
        cfg = params.train
        self.components, self.params, self.folder, self.device, self.logger = components, params, folder, device, logger
        samples = resolve_samples(cfg, root)
        self.prompts: list[SamplePrompt] = samples.prompts
        self.every_n_steps, self.every_n_epochs = samples.every_n_steps, samples.every_n_epochs
        self.enabled = enabled and bool(self.prompts)  # the main process draws
        self.plain = cfg.ema_sample_nonema_model if cfg.ema_sample_nonema_model is not None else not ema_on
        self.with_ema = cfg.ema_sample_ema_model if cfg.ema_sample_ema_model is not None else ema_on
        self._vae: Any = None
        if self.enabled:
            self._check_steps(cfg)
        if self.enabled and cfg.zero_terminal_snr:
            for name in samplers_in_use(self.prompts, cfg.sample_sampler):
                if not rescales_to_zero_snr(name, components.prediction_type):
                    log.warning(
                        "samples: the %s sampler cannot draw from the zero-terminal-SNR schedule (train.zero_terminal_snr) "
                        "of a %s model; it draws on the base's schedule, as kohya's does (%s can)",
                        name, components.prediction_type, ", ".join(ZERO_SNR_SAMPLERS),
                    )

    def _check_steps(self, cfg: TrainParams) -> None:
        """Each prompt's step count on its sampler, tried now rather than at the first draw, hours in (PNDM's
        Runge-Kutta warm-up, which a base without skip_prk_steps keeps, needs 4 steps or more)."""
        for steps, name in sorted({(prompt.steps, getattr(prompt, "sampler", None) or cfg.sample_sampler) for prompt in self.prompts}):
            scheduler = make_scheduler(name, self.components.noise_scheduler.config, cfg.zero_terminal_snr)
            try:
                scheduler.set_timesteps(steps)
            except Exception:  # whatever diffusers raises: a numpy ValueError, for PNDM
                raise KilnError(
                    f"samples: the {name} sampler cannot draw in {steps} steps; give the prompt more steps, or choose another sampler"
                ) from None

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
        images = render(
            self.components, unet, self.vae, self.prompts, self.device, clip_skip, cfg.zero_terminal_snr, cfg.sample_sampler,
        )
        grid = save_grid(images, self.prompts, global_step, self.folder / f"{file_name}.png")
        self.logger.image(global_step, tag, grid)
