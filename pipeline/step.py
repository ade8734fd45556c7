"""The training step as one unit: the one place the UNet is called, and prepare -> predict -> loss -> backward.

Training, validation and reflow all go through `encode` and `predict`, so the text encoding (clip_skip,
embedding perturbation, SDXL's empty-caption zeros) and SDXL's extra UNet inputs are built one way
(kohya's call_unet / process_batch, SimpleTuner's model_predict). The step never asks which objective is
active: DDPM and rectified flow share one interface (pipeline.objective.Objective).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.objective import Objective
from pipeline.params import TrainParams
from pipeline.sd import SDComponents, TextEmbeddingCache, perturb, text_embeddings


@dataclass
class Conditioning:
    """What the UNet is conditioned on besides the noisy latents and timesteps."""

    encoder_hidden_states: torch.Tensor  # (B, 77, D)
    added_cond_kwargs: dict[str, torch.Tensor] | None = None  # SDXL: pooled text_embeds (B, 1280), time_ids (B, 6)


@dataclass
class StepOutput:
    loss: torch.Tensor  # the batch loss, still on the device (reading it is a host sync)
    per_sample: torch.Tensor  # (B,)
    fourier_component: torch.Tensor | None  # (B,), with loss_type fourier
    timesteps: torch.Tensor  # (B,) what the UNet was told


class TrainingStep:
    """One optimizer micro-step's work on a loader batch, and the UNet call everything else shares.

    `unet` is the model as accelerate prepared it; `backward` is accelerator.backward (mixed precision's
    loss scaling). `cfg` and `objective` change together when load_settings_every_epoch reloads them.
    """

    def __init__(
        self, unet: Any, components: SDComponents, objective: Objective, cfg: TrainParams, device: Any,
        backward: Callable[[torch.Tensor], None], text_cache: TextEmbeddingCache | None = None,
    ):
        self.unet, self.components, self.device, self.backward = unet, components, device, backward
        self.scaling = components.scaling_factor  # the VAE's, from its config
        self.text_cache = text_cache  # train.cache_text_encoder_outputs: frozen encoders' outputs per caption
        self.configure(cfg, objective)

    def configure(self, cfg: TrainParams, objective: Objective) -> None:
        self.cfg, self.objective = cfg, objective
        if self.text_cache is not None and self.text_cache.clip_skip != cfg.clip_skip:
            self.text_cache.reset(cfg.clip_skip)

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's cached latents on the device, in the UNet's space (times the VAE scaling factor)."""
        return batch["latents"].to(self.device) * self.scaling

    def encode(self, captions: list[str], time_ids: torch.Tensor, generator: torch.Generator | None = None) -> Conditioning:
        """Text conditioning for `captions`; with a training generator, embedding_perturbation is drawn from it."""
        perturbation = self.cfg.embedding_perturbation if generator is not None else 0.0
        if self.text_cache is not None:
            states, pooled = self.text_cache(captions)
        else:
            states, pooled = text_embeddings(self.components, captions, self.device, self.cfg.clip_skip)
        states = perturb(states, perturbation, generator)
        if pooled is None:
            return Conditioning(states)
        return Conditioning(states, {"text_embeds": pooled, "time_ids": time_ids.to(self.device, torch.float32)})

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The UNet's prediction (noise, v or flow velocity, as the objective trains it): its only call site."""
        extra = {"added_cond_kwargs": conditioning.added_cond_kwargs} if conditioning.added_cond_kwargs else {}
        return self.unet(
            noisy_latents.to(self.device), timesteps.to(self.device),
            encoder_hidden_states=conditioning.encoder_hidden_states, **extra,
        ).sample

    def loss(
        self, batch: dict[str, Any], global_step: int, generator: torch.Generator,
        latents: torch.Tensor | None = None, noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """prepare -> predict -> loss. The text is encoded first, so its perturbation draws come before the
        timesteps and noise. `latents` and `noise` replace the batch's latents and the drawn noise (reflow
        trains on the model's own (x0', x1'') pairs with the batch's conditioning)."""
        conditioning = self.encode(batch["captions"], batch["time_ids"], generator)
        latents = self.latents(batch) if latents is None else latents.to(self.device)
        noisy = self.objective.prepare(latents, batch["is_reg"], generator, global_step, noise)
        model_pred = self.predict(noisy.noisy_latents, noisy.timesteps, conditioning)
        masks = batch["masks"].to(latents) if self.cfg.masked_loss and batch["masks"] is not None else None
        result = self.objective.compute_loss(model_pred, noisy, batch["loss_weight"].to(self.device), masks, global_step)
        return StepOutput(result.loss, result.per_sample, result.fourier_component, noisy.timesteps)

    def train_step(
        self, batch: dict[str, Any], global_step: int, generator: torch.Generator,
        latents: torch.Tensor | None = None, noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """prepare -> predict -> loss -> backward; the optimizer step is the loop's (it owns accumulation)."""
        output = self.loss(batch, global_step, generator, latents, noise)
        self.backward(output.loss)
        return output

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """No gradients and the UNet in eval mode (dropout off), restored after."""
        was_training = self.unet.training
        self.unet.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.unet.train(was_training)
