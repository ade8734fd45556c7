"""Built-in random presets: the real architectures at toy width, built from config with a fixed seed.

They let every stage run on a CPU with no download. A preset is written once to a folder in the format
real weights use (safetensors + config + tokenizer files), and then loaded from that folder by the same
code that loads real weights, so tests and the demo exercise the real path.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Bump when a preset's architecture or files change, so old cached folders are not reused.
PRESET_VERSION = 4
SEED = 0

TINY_WORDS = (
    "a an the of on in with and is red blue green yellow purple orange white black circle square "
    "triangle shape photo picture drawing background gradient small large banner flat colour"
).split()

# WD14 layout: tag_id, name, category (0 general, 4 character, 9 rating).
TINY_TAGS = [
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("sks_character", 4), ("other_character", 4),
    ("circle", 0), ("square", 0), ("triangle", 0), ("red_background", 0), ("blue_background", 0),
    ("gradient", 0), ("simple_background", 0), ("no_humans", 0), ("flat_colour", 0), ("white_background", 0),
]


def cache_root() -> Path:
    """Where presets are written: $KILN_CACHE, else ~/.cache/kiln."""
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2, CLIP), so every byte is a token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_tiny_blip(folder: Path) -> None:
    """BlipForConditionalGeneration with a 2-layer-wide toy config and a small WordPiece vocabulary."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    try:
        from transformers import (
            BlipImageProcessorPil as ImageProcessor,  # transformers >= 5 without torchvision
        )
    except ImportError:
        from transformers import BlipImageProcessor as ImageProcessor

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = specials + TINY_WORDS + list(letters + ",.") + [f"##{c}" for c in letters]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(SEED)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128, encoder_hidden_size=32,
            bos_token_id=vocab.index("[DEC]"), sep_token_id=vocab.index("[SEP]"), pad_token_id=0,
        ),
        vision_config=dict(hidden_size=32, image_size=64, patch_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def tiny_clip_tokenizer(folder: Path) -> tuple[object, dict[str, int]]:
    """A CLIPTokenizer with a byte-level vocabulary and no merges: every character is a token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    characters = list(_bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # 77 tokens, as every SD text encoder takes.
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77), vocab


def _tiny_text_config(vocab: dict[str, int], **extra: object) -> dict[str, object]:
    end = vocab["<|endoftext|>"]
    return dict(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end, **extra,
    )


def build_tiny_clip(folder: Path) -> None:
    """CLIPModel at toy width with the byte-level tiny tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer, vocab = tiny_clip_tokenizer(folder)
    torch.manual_seed(SEED)
    config = CLIPConfig(
        text_config=_tiny_text_config(vocab),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def write_selected_tags(folder: Path, tags: list[tuple[str, int]]) -> None:
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category) in enumerate(tags):
            writer.writerow([index, name, category, 1000 - index])


def export_wd14_onnx(module: object, folder: Path, size: int) -> None:
    """Export a torch module as a WD14-layout tagger: NHWC float32 BGR 0..255 in, sigmoid scores out."""
    import warnings


    # The TorchScript exporter needs only `onnx`; the newer dynamo exporter would also need onnxscript.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(module, folder, size)


def _export(module: object, folder: Path, size: int) -> None:
    import torch

    torch.onnx.export(
        module,
        (torch.zeros(1, size, size, 3),),
        str(folder / "model.onnx"),
        input_names=["input_1:0"],
        output_names=["predictions_sigmoid"],
        dynamic_axes={"input_1:0": {0: "batch"}, "predictions_sigmoid": {0: "batch"}},
        dynamo=False,
    )


def build_tiny_wd14(folder: Path) -> None:
    """A small convolutional tagger exported to ONNX in the WD14 layout, with its selected_tags.csv."""
    import torch

    class TinyTagger(torch.nn.Module):
        def __init__(self, tags: int):
            super().__init__()
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            )
            self.head = torch.nn.Linear(16, tags)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            # images: (N, H, W, 3) BGR in 0..255, as WD14 taggers take them.
            x = images.permute(0, 3, 1, 2) / 255.0
            return torch.sigmoid(self.head(self.features(x)))

    torch.manual_seed(SEED)
    export_wd14_onnx(TinyTagger(len(TINY_TAGS)).eval(), folder, size=64)
    write_selected_tags(folder, TINY_TAGS)


def tiny_vae(scaling_factor: float) -> object:
    """AutoencoderKL with the real 4-level layout (8x downsampling, 4 latent channels) at toy width."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=64, scaling_factor=scaling_factor,
    )


def build_tiny_sd15(folder: Path) -> None:
    """A Stable Diffusion 1.x pipeline folder (diffusers layout) with every model at toy width."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = tiny_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(0.18215), text_encoder=CLIPTextModel(CLIPTextConfig(**_tiny_text_config(vocab))),
        tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            steps_offset=1, clip_sample=False,
        ),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def build_tiny_sdxl(folder: Path) -> None:
    """A Stable Diffusion XL pipeline folder: two text encoders, text_time conditioning, toy width."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, vocab = tiny_clip_tokenizer(folder / "tokenizer")
    tokenizer_2, _ = tiny_clip_tokenizer(folder / "tokenizer_2")
    torch.manual_seed(SEED)
    # The encoders differ in width, as SDXL's do (768 and 1280), so a single-file checkpoint tells them
    # apart: cross_attention_dim = 32 + 48 (both encoders' hidden states, concatenated);
    # projection_class_embeddings_input_dim = 32 (pooled, projected text) + 6 time ids x 8.
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=80, norm_num_groups=8,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=tiny_vae(0.13025),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_tiny_text_config(vocab))),
        text_encoder_2=CLIPTextModelWithProjection(
            CLIPTextConfig(**{**_tiny_text_config(vocab, projection_dim=32), "hidden_size": 48, "intermediate_size": 96})
        ),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000),
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


# The real architectures at full width, random weights: benchmarks and GPU tests measure the real cost with
# no download. Values from the released models' configs (SD 1.5's unet/text_encoder/vae config.json; SDXL
# base 1.0's). The tokenizer is the tiny byte-level one: the embedding tables keep CLIP's 49,408 rows.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, hidden_act="gelu", projection_dim=1280)
CLIP_VOCAB = 49408


def full_vae(scaling_factor: float, force_upcast: bool) -> object:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
        sample_size=512 if not force_upcast else 1024, scaling_factor=scaling_factor, force_upcast=force_upcast,
    )


def _full_text_config(vocab: dict[str, int], width: dict[str, object]) -> dict[str, object]:
    return {**_tiny_text_config(vocab), **width, "vocab_size": CLIP_VOCAB}


def sd15_unet() -> object:
    """SD 1.5's UNet (860M parameters): diffusers' defaults are SD 1.x's, but for the text width."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def build_random_sd15(folder: Path) -> None:
    """Stable Diffusion 1.5's architecture at full width (UNet 860M, CLIP ViT-L text encoder, VAE), random weights."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = tiny_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(SEED)
    pipeline = StableDiffusionPipeline(
        vae=full_vae(0.18215, force_upcast=False),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_full_text_config(vocab, CLIP_L))),
        tokenizer=tokenizer,
        unet=sd15_unet(),
        scheduler=DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            steps_offset=1, clip_sample=False,
        ),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def sdxl_unet() -> object:
    """SDXL base 1.0's UNet (2.6B parameters)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def build_random_sdxl(folder: Path) -> None:
    """SDXL base 1.0's architecture at full width (UNet 2.6B, CLIP ViT-L and OpenCLIP bigG, VAE), random weights."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, vocab = tiny_clip_tokenizer(folder / "tokenizer")
    tokenizer_2, _ = tiny_clip_tokenizer(folder / "tokenizer_2")
    torch.manual_seed(SEED)
    pipeline = StableDiffusionXLPipeline(
        vae=full_vae(0.13025, force_upcast=True),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_full_text_config(vocab, CLIP_L))),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_full_text_config(vocab, CLIP_BIG_G))),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=sdxl_unet(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000),
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


PRESETS: dict[str, Callable[[Path], None]] = {
    "tiny-sd15": build_tiny_sd15,
    "tiny-sdxl": build_tiny_sdxl,
    "random-sd15": build_random_sd15,
    "random-sdxl": build_random_sdxl,
    "tiny-blip": build_tiny_blip,
    "tiny-clip": build_tiny_clip,
    "tiny-wd14": build_tiny_wd14,
}

# The presets that fit each params key, for the error messages that list them. Every key not named
# here (model.base, model.config, cache.vae) takes a Stable Diffusion model.
SD_PRESETS = ("tiny-sd15", "tiny-sdxl")
KEY_PRESETS = {"caption.model": ("tiny-blip",), "tag.model": ("tiny-wd14", "tiny-clip")}


def presets_for(key: str) -> tuple[str, ...]:
    """The presets a params key may name: `caption.model` a captioner, `tag.model` a tagger, else a SD model."""
    return KEY_PRESETS.get(key, SD_PRESETS)


def preset_dir(name: str) -> Path:
    """The folder of a built-in preset, built on first use (atomically, so a killed build leaves nothing)."""
    folder = cache_root() / "presets" / f"{name}-v{PRESET_VERSION}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        PRESETS[name](staging)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # another process did not win the race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
