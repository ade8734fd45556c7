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
