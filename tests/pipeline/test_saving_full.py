"""The full fine-tune's diffusers folder: text encoders under transformers 4's names, loadable by the installed
transformers, with deterministic bytes and the umask's file modes."""

from pathlib import Path

import pytest
import torch

from pipeline.saving import save_full_model
from pipeline.sd import SDComponents, load_components
from tests.pipeline.test_tables import umask
from tests.pipeline.test_weights import stored_keys, transformers4_clip_keys

ENCODERS = ("text_encoder", "text_encoder_2")


def single_file_base(folder: Path) -> SDComponents:
    """tiny-sd15 read back from an A1111-style single file: the branch that saves the whole pipeline."""
    from diffusers import AutoencoderKL

    from pipeline.presets import preset_dir
    from pipeline.single_file import save_single_file

    preset = load_components("tiny-sd15")
    vae = AutoencoderKL.from_pretrained(preset_dir("tiny-sd15"), subfolder="vae")
    path = save_single_file(folder / "base.safetensors", "sd", preset.unet, vae, preset.text_encoders, {})
    return load_components(str(path), config="tiny-sd15")


def saved(components: SDComponents, folder: Path) -> Path:
    with umask(0o022):
        save_full_model(components, components.unet, folder)
    return folder


@pytest.mark.parametrize(
    ("base", "train_text_encoders"),
    [("tiny-sd15", False), ("tiny-sd15", True), ("tiny-sdxl", False), ("tiny-sdxl", True), ("single-file", False)],
    ids=["sd15-copied", "sd15-trained", "sdxl-copied", "sdxl-trained", "sd15-single-file-base"],
)
def test_text_encoders_carry_transformers_4_names_and_reload_identical(tmp_path, base, train_text_encoders):
    from diffusers import DiffusionPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    components = single_file_base(tmp_path) if base == "single-file" else load_components(base)
    for encoder in components.text_encoders:
        encoder.requires_grad_(train_text_encoders)  # trained encoders are saved, frozen ones copied from the base
    folder = saved(components, tmp_path / "diffusers")

    for name, encoder in zip(ENCODERS, components.text_encoders, strict=False):
        # transformers 5 alone writes CLIPTextModel's names without `text_model.`; 4.x then loads random weights.
        assert stored_keys(folder / name) == transformers4_clip_keys(encoder.config, name == "text_encoder_2")
        cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        reloaded = cls.from_pretrained(folder, subfolder=name).state_dict()
        assert reloaded.keys() == encoder.state_dict().keys()
        assert all(torch.equal(value, reloaded[key]) for key, value in encoder.state_dict().items())
    pipeline = DiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for name, encoder in zip(ENCODERS, components.text_encoders, strict=False):
        loaded = getattr(pipeline, name).state_dict()
        assert all(torch.equal(value, loaded[key]) for key, value in encoder.state_dict().items())

    # Identical weights give identical bytes (DVC skips unchanged stages), and others may read every file.
    again = saved(components, tmp_path / "again")
    for name in ENCODERS[: len(components.text_encoders)]:
        files = sorted(path.name for path in (folder / name).iterdir())
        assert files == sorted(path.name for path in (again / name).iterdir())
        assert all((folder / name / file).read_bytes() == (again / name / file).read_bytes() for file in files)
    modes = {str(path.relative_to(folder)): path.stat().st_mode & 0o777 for path in folder.rglob("*") if path.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}
