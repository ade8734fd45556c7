"""Benchmark the caption and tag models: batched against one-image-at-a-time inference, same run.

    python bench/caption_tag.py              # tiny BLIP and tiny WD14 on the CPU
    python bench/caption_tag.py --images 96

Where CUDA is available it also times the real-size BLIP-base architecture (random weights, built
from config) at batch 32 against batch 1, in float16.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.caption import Captioner  # noqa: E402
from pipeline.demo_data import write_demo_data  # noqa: E402
from pipeline.inference import load_rgb  # noqa: E402
from pipeline.params import CaptionParams, TagParams  # noqa: E402
from pipeline.presets import build_tiny_blip, build_tiny_wd14  # noqa: E402
from pipeline.tag import WD14Tagger  # noqa: E402


def images_per_second(model: Callable[[list[Any]], list[Any]], inputs: list[Any], batch_size: int) -> float:
    model(inputs[:batch_size])  # warm-up: first-call allocation and kernel selection are not measured
    start = time.perf_counter()
    for index in range(0, len(inputs), batch_size):
        model(inputs[index : index + batch_size])
    return len(inputs) / (time.perf_counter() - start)


def report(name: str, model: Callable[[list[Any]], list[Any]], inputs: list[Any], batch_size: int) -> None:
    single = images_per_second(model, inputs, 1)
    batched = images_per_second(model, inputs, batch_size)
    print(f"{name:34s} batch 1: {single:8.1f} img/s   batch {batch_size}: {batched:8.1f} img/s   {batched / single:5.2f}x")


def blip_base_gpu(images: list[Any], folder: Path) -> None:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    # BlipConfig() is the BLIP-base architecture (ViT-B/16 at 384 px, BERT-base decoder).
    model = BlipForConditionalGeneration(BlipConfig()).to("cuda", torch.float16).eval()
    processor = BlipProcessor.from_pretrained(folder)
    processor.image_processor.size = {"height": 384, "width": 384}

    def caption(batch: list[Any]) -> list[Any]:
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to("cuda", torch.float16)
        with torch.inference_mode():
            ids = model.generate(pixel_values=pixels, max_new_tokens=30, min_new_tokens=30, num_beams=1)
        torch.cuda.synchronize()
        return ids

    report("BLIP-base (random), cuda fp16", caption, images, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kiln-bench-caption-") as tmp:
        root = Path(tmp)
        write_demo_data(root / "raw")
        pool = [load_rgb(path) for path in sorted((root / "raw").rglob("*.png")) if "masklabel" not in path.name]
        images = [pool[index % len(pool)] for index in range(args.images)]
        (root / "blip").mkdir()
        build_tiny_blip(root / "blip")
        (root / "wd14").mkdir()
        build_tiny_wd14(root / "wd14")

        captioner = Captioner(root / "blip", CaptionParams(max_new_tokens=20, device="cpu"))
        report("tiny BLIP caption, cpu", captioner, images, args.batch_size)

        tagger = WD14Tagger(root / "wd14", TagParams(device="cpu"))
        report("tiny WD14 tag, cpu", tagger, [tagger.preprocess(image) for image in images], args.batch_size)

        import torch

        if torch.cuda.is_available():
            blip_base_gpu(images, root / "blip")
        else:
            print("no CUDA device: the BLIP-base figures need a GPU")


if __name__ == "__main__":
    main()
