"""The built-in tiny models: deterministic, in the real on-disk formats, loaded like real weights."""

from pipeline.inference import fingerprint
from pipeline.presets import build_tiny_sd15, preset_dir
from pipeline.sd import load_components


def test_a_preset_is_built_the_same_every_time(tmp_path):
    # Byte-identical weights and configs, so cache keys made with a preset are stable across machines.
    build_tiny_sd15(tmp_path / "a")
    build_tiny_sd15(tmp_path / "b")
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")
    assert (tmp_path / "a" / "model_index.json").is_file() and (tmp_path / "a" / "unet" / "config.json").is_file()


def test_presets_load_through_the_path_real_weights_take():
    components = load_components("tiny-sd15")
    assert components.folder == preset_dir("tiny-sd15") and components.version == "sd1"
    assert load_components("tiny-sdxl").version == "sdxl"


def test_the_random_presets_have_the_released_models_architectures():
    """random-sd15 / random-sdxl: full width, built from the released configs. Counted on the meta device
    (no memory); the counts are the released models' own (SD 1.5, SDXL base 1.0)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipeline import presets

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}

    def count(module):
        return sum(param.numel() for param in module.parameters())

    with torch.device("meta"):
        assert count(presets.sd15_unet()) == 859_520_964
        assert count(presets.sdxl_unet()) == 2_567_463_684
        assert count(CLIPTextModel(CLIPTextConfig(**presets._full_text_config(vocab, presets.CLIP_L)))) == 123_060_480
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**presets._full_text_config(vocab, presets.CLIP_BIG_G)))) == 694_659_840
        assert count(presets.full_vae(0.18215, force_upcast=False)) == 83_653_863
    assert {"random-sd15", "random-sdxl"} <= set(presets.PRESETS)
