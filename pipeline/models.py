"""Loading the Stable Diffusion models a stage needs from `model.base` (or an override).

One loader for every stage: a diffusers folder, a single .safetensors/.ckpt file (diffusers'
from_single_file; .ckpt is read by diffusers with torch.load(weights_only=True), never unpickled), a hub
id that is cached or reachable, or a built-in `tiny-sd15` / `tiny-sdxl` preset.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import KilnError
from pipeline.inference import fingerprint, resolve_model


def refused_pickle(exc: BaseException | None) -> str | None:
    """What torch.load(weights_only=True) refused to unpickle (the global it names, e.g. `posix.system`) when
    `exc`, or an error it wraps (diffusers re-raises load errors as OSError), is that refusal; else None.
    torch's own message advises retrying with weights_only=False, which runs the pickle: never relay it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, pickle.UnpicklingError):
            found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"WeightsUnpickler error: ([^\n]+)", str(exc))
            return found.group(1) if found else "not a plain tensor pickle"
        exc = exc.__cause__ or exc.__context__
    return None


def pickle_error(key: str, path: Path, exc: BaseException) -> KilnError | None:
    """The one-line error for a model file holding pickled Python objects, or None for any other error."""
    refused = refused_pickle(exc)
    if refused is None:
        return None
    return KilnError(
        f"{key}: {path} holds pickled Python objects ({refused}) that Kiln does not load; "
        "convert it to .safetensors with a tool you trust"
    )


@dataclass
class VAESource:
    """Where a VAE's weights are, and their fingerprint; enough to compute cache keys without loading."""

    path: Path  # a VAE folder or a single checkpoint file
    fingerprint: str
    name: str
    key: str
    config: str | None = None  # model.config: the architecture's diffusers folder, for a single file

    def load(self) -> LoadedVAE:
        from diffusers import AutoencoderKL

        try:
            if self.path.is_file():
                extra = {"config": str(resolve_model(self.config, "model.config").folder), "subfolder": "vae"} if self.config else {}
                vae = AutoencoderKL.from_single_file(str(self.path), **extra)
            else:
                vae = AutoencoderKL.from_pretrained(self.path)
        except (OSError, ValueError, pickle.UnpicklingError) as exc:
            error = pickle_error(self.key, self.path, exc)
            raise error or KilnError(f"{self.key}: cannot load a VAE from {self.path} ({exc.__class__.__name__}: {exc})") from None
        return LoadedVAE(vae.eval().requires_grad_(False), self.fingerprint, self.name)


@dataclass
class LoadedVAE:
    vae: Any
    fingerprint: str
    name: str

    @property
    def downsample(self) -> int:
        """Pixels per latent cell: 2 ** (levels - 1), 8 for every SD family."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


def _vae_folder(folder: Path) -> Path | None:
    """The folder holding an AutoencoderKL config: `<pipeline>/vae` or a VAE-only folder."""
    for candidate in (folder / "vae", folder):
        config = candidate / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == "AutoencoderKL":
            return candidate
    return None


def find_vae(spec: str, key: str, config: str | None = None) -> VAESource:
    """Locate and fingerprint the VAE of a model spec (hashing only the VAE's own files).

    `config` (model.config) names the diffusers configs a single-file checkpoint is read with.
    """
    model = resolve_model(spec, key)
    if model.folder.is_file():
        return VAESource(model.folder, fingerprint(model.folder), model.name, key, config)
    folder = _vae_folder(model.folder)
    if folder is None:
        raise KilnError(
            f"{key}: {model.folder} holds no VAE (no vae/config.json or AutoencoderKL config.json); "
            "point it at a diffusers model folder, a VAE folder or a single .safetensors file"
        )
    return VAESource(folder, fingerprint(folder), model.name, key)


def load_vae(spec: str, key: str, config: str | None = None) -> LoadedVAE:
    """The VAE of a model spec, in float32 on the CPU."""
    return find_vae(spec, key, config).load()
