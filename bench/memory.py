"""Peak memory of Kiln's trainer at batch 1, per family and mode, as configured and with the small-card options.

    python bench/memory.py                      # on a GPU: random-sd15 at 512 and random-sdxl at 1024
    python bench/memory.py --weights tiny       # the tiny presets (what runs on a CPU)

Each configuration trains a few steps in its own process (accelerate keeps one state per process, and a
peak is only a peak in a fresh one) and reports torch.cuda.max_memory_allocated on a GPU; on a CPU the
process's peak resident memory, which includes Python and the libraries (a smoke run, not the figure the
targets speak of). The small-card options: bf16 mixed precision (a LoRA's frozen base then in bf16),
gradient checkpointing, cached text-encoder outputs, and an 8-bit AdamW (bitsandbytes, on a GPU) or
Adafactor for a full fine-tune.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (family, mode, options name, train params, target GiB from issue 14 or None)
SMALL_CARD = {"mixed_precision": "bf16", "gradient_checkpointing": True, "cache_text_encoder_outputs": True}
CONFIGS = [
    ("sd15", "lora", "as configured", {}, None),
    ("sd15", "lora", "small card", {**SMALL_CARD, "optimizer": "adamw8bit"}, 4.0),
    ("sdxl", "lora", "as configured", {}, None),
    ("sdxl", "lora", "small card", {**SMALL_CARD, "optimizer": "adamw8bit"}, 8.0),
    ("sdxl", "full", "small card", {**SMALL_CARD, "optimizer": "adafactor", "clip_grad_norm": None}, 24.0),
]
SIDES = {"random": {"sd15": 512, "sdxl": 1024}, "tiny": {"sd15": 256, "sdxl": 256}}


def train_once(spec: dict) -> dict:
    """In a fresh process: train `steps` steps on the prepared project and report the peak."""
    import torch
    from project import Project

    from pipeline.params import validate_params
    from pipeline.train import run as run_train

    project = Project(**_project_paths(Path(spec["root"])))
    train = {"batch_size": 1, "workers": 0, "max_train_steps": spec["steps"], "mode": spec["mode"], **spec["train"]}
    if not torch.cuda.is_available() and train.get("optimizer") == "adamw8bit":
        train["optimizer"] = "adamw"  # bitsandbytes' 8-bit AdamW needs CUDA
    params = validate_params({"model": {"base": spec["base"]}, "train": train})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_train(params, project.train_paths(Path(spec["models"])))
    if torch.cuda.is_available():
        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "what": "GPU"}
    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "what": "host RSS"}


def _project_paths(root: Path) -> dict:
    from pipeline.bucket import BucketPaths
    from pipeline.cache import CachePaths
    from pipeline.scan import ScanPaths

    scan = ScanPaths(root / "raw", root / "scan")
    bucket = BucketPaths(scan.files, root / "bucket")
    cache = CachePaths(bucket.buckets, scan.files, root / "raw", root / "latents")
    return {"root": root, "scan": scan, "bucket": bucket, "cache": cache, "plan": root / "plan" / "plan.parquet"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", choices=["random", "tiny"], default=None, help="random (full width) on a GPU, tiny on a CPU")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a configuration, as JSON: run it in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(train_once(json.loads(args.one))))
        return

    import torch
    from project import demo_project

    weights = args.weights or ("random" if torch.cuda.is_available() else "tiny")
    families = args.families.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-memory-") as tmp:
        for family in families:
            base, side = f"{weights}-{family}", SIDES[weights][family]
            root = Path(tmp) / family
            demo_project(root, base, side)
            for name, (config_family, mode, options, train, target) in enumerate(CONFIGS):
                if config_family != family:
                    continue
                spec = {
                    "base": base, "root": str(root), "models": str(Path(tmp) / f"models-{name}"), "steps": args.steps,
                    "mode": mode, "train": train,
                }
                done = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, check=False,
                )
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["?"])[-1]
                    rows.append((base, side, mode, options, None, None, target, last))
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append((base, side, mode, options, result["peak_gib"], result["what"], target, ""))
    print(f"{'model':<12} {'px':>5} {'mode':<5} {'options':<14} {'peak GiB':>9}  {'of':<8} {'target':>7}")
    for base, side, mode, options, peak, what, target, problem in rows:
        shown = f"{peak:9.2f}" if peak is not None else f"{'failed':>9}"
        goal = f"{target:7.1f}" if target is not None else f"{'':>7}"
        print(f"{base:<12} {side:>5} {mode:<5} {options:<14} {shown}  {what or '':<8} {goal}  {problem}")
    print("small card: " + ", ".join(f"{key}={value}" for key, value in SMALL_CARD.items()) + "; adamw8bit (LoRA) or adafactor (full)")


if __name__ == "__main__":
    main()
