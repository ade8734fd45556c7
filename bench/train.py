"""Benchmark Kiln's train step against a plain diffusers-style loop, same model, batch and data.

    python bench/train.py                               # tiny-sd15, 256 px, batch 4, on the GPU if there is one
    python bench/train.py --base tiny-sdxl --mixed-precision bf16
    python bench/train.py --base random-sd15 --resolution 512 --batch-size 16 --mixed-precision bf16 --compile   # a GPU

The plain loop is what the diffusers training examples do every step: VAE-encode the images and
text-encode the captions, then the UNet forward and backward with AdamW, eager. Kiln reads cached
latents through its loader instead. Both train the same LoRA, on the same device. Kiln runs twice: as
configured by default, and with its fast paths (train.cache_text_encoder_outputs, train.compile_unet;
under mixed precision the frozen base is in the compute dtype either way). Prints the rates and ratios.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from project import demo_project, seconds_until, torch_import_seconds  # noqa: E402  (bench/project.py)

from pipeline.cache import plan, prepare  # noqa: E402
from pipeline.lora import UNET_ATTENTION, add_lora  # noqa: E402
from pipeline.models import find_vae  # noqa: E402
from pipeline.objective import DiffusionObjective  # noqa: E402
from pipeline.params import CacheParams, validate_params  # noqa: E402
from pipeline.sd import encode_text, load_components  # noqa: E402
from pipeline.tables import read_table  # noqa: E402
from pipeline.train import run as run_train  # noqa: E402


def plain_rate(
    base: str, files: Path, buckets: Path, raw: Path, captions: list[str], batch_size: int, steps: int, device: str,
) -> float:
    """images/s of the plain loop: VAE encode + text encode + UNet step every iteration, in float32."""
    components = load_components(base)
    source = find_vae(base, "model.base")
    vae = source.load().vae.to(device)
    entries = plan(read_table(files), read_table(buckets), CacheParams(), "lanczos", source.fingerprint, "torch.float32")
    pixels = torch.from_numpy(np.stack([prepare(entry, raw, "lanczos", 8).pixels for entry in entries])).to(device)
    components.unet.to(device)
    for encoder in components.text_encoders:
        encoder.to(device)
    params = add_lora(components.unet, 4, 2.0, 0.0, UNET_ATTENTION)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = DiffusionObjective.from_scheduler(components.noise_scheduler)
    generator = torch.Generator().manual_seed(0)  # Kiln's draws are on a CPU generator too (pipeline/noise.py)

    def step(index: int) -> None:
        rows = [(index * batch_size + k) % len(entries) for k in range(batch_size)]
        with torch.no_grad():
            latents = vae.encode(pixels[rows]).latent_dist.sample(generator) * components.scaling_factor
            states, _ = encode_text(components, [captions[row % len(captions)] for row in rows], device)
        timesteps = objective.sample_timesteps(torch.zeros(batch_size), torch.full((batch_size,), 1000), generator)
        noisy = objective.add_noise(latents, timesteps.to(device), generator)
        prediction = components.unet(noisy.noisy_latents, noisy.timesteps, encoder_hidden_states=states).sample
        loss = objective.compute_loss(prediction, noisy, torch.ones(batch_size, device=device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up
    start = time.perf_counter()
    for index in range(1, steps + 1):
        step(index)
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--base", default="tiny-sd15",
        help="model.base: tiny-sd15, tiny-sdxl, random-sd15 / random-sdxl (full width, random weights), or a model folder",
    )
    parser.add_argument("--resolution", type=int, default=256, help="the square bucket's side (512 for SD 1.5, 1024 for SDXL)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="Kiln's train.mixed_precision")
    parser.add_argument("--compile", action="store_true", help="also train.compile_unet in the fast run (minutes to compile on a CPU)")
    args = parser.parse_args()
    base = args.base
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="kiln-bench-train-") as tmp:
        root = Path(tmp)
        project = demo_project(root, base, args.resolution)
        captions = [row["caption"] for row in read_table(project.plan)]

        plain = plain_rate(base, project.scan.files, project.bucket.buckets, root / "raw", captions, args.batch_size, args.steps, device)
        train = {
            "batch_size": args.batch_size, "workers": 0, "max_train_steps": args.steps + 1, "network_dim": 4,
            "network_alpha": 2.0, "mixed_precision": args.mixed_precision,
        }
        fast = {"cache_text_encoder_outputs": True, "compile_unet": args.compile}
        rates = {}
        for name, extra in (("default", {}), ("fast paths", fast)):
            params = validate_params({"model": {"base": base}, "train": {**train, **extra}})
            rates[name] = run_train(params, project.train_paths(root / "models")).images_per_second
            shutil.rmtree(root / "models")

        # Start-up: from `kiln train` starting to its "ready" line (the model loaded, the loader and
        # optimizer built; the first batch comes next), next to importing torch alone.
        params_file = root / "params.yaml"
        params_file.write_text(yaml.safe_dump({"model": {"base": base}, "train": train}))
        paths = project.train_paths(root / "models")
        command = [
            str(Path(sys.executable).parent / "kiln"), "train", "--params", str(params_file), "--plan", str(paths.plan),
            "--latents", str(paths.store), "--index", str(paths.index), "--models", str(paths.models),
        ]
        startup = seconds_until(command, "train: ready at step", root)
        torch_s = torch_import_seconds()

    print(f"{base} at {args.resolution} px on {device}, batch {args.batch_size}, mixed precision {args.mixed_precision}")
    print(f"plain diffusers-style loop (VAE + text encode every step, float32): {plain:7.2f} images/s")
    for name, rate in rates.items():
        print(f"kiln train step, {name + ':':<11}                              {rate:7.2f} images/s   {rate / plain:.2f}x")
    print("target: >= 1.4x the plain loop (issue 14)")
    print(f"start-up: `kiln train` until it is ready for its first batch {startup:.2f} s, of which importing torch {torch_s:.2f} s   (target: under 5 s besides torch)")


if __name__ == "__main__":
    main()
