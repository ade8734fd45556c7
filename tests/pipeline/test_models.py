"""Finding the VAE of a base: a diffusers pipeline folder, a VAE-only folder, or a clear error."""

import shutil

import pytest

from pipeline.errors import KilnError
from pipeline.inference import fingerprint
from pipeline.models import find_vae, load_vae
from pipeline.presets import preset_dir


def test_the_vae_of_a_pipeline_folder_and_of_a_vae_folder_is_the_same(tmp_path):
    pipeline = preset_dir("tiny-sd15")
    source = find_vae(str(pipeline), "model.base")
    assert source.path == pipeline / "vae" and source.fingerprint == fingerprint(pipeline / "vae")
    shutil.copytree(pipeline / "vae", tmp_path / "my-vae")
    alone = find_vae(str(tmp_path / "my-vae"), "cache.vae")
    assert alone.fingerprint == source.fingerprint  # only the VAE's own files identify it
    loaded = load_vae(str(tmp_path / "my-vae"), "cache.vae")
    assert loaded.downsample == 8 and loaded.scaling_factor == pytest.approx(0.18215)
    assert not any(param.requires_grad for param in loaded.vae.parameters())


def test_a_folder_without_a_vae_names_the_key(tmp_path):
    shutil.copytree(preset_dir("tiny-sd15") / "unet", tmp_path / "unet-only")
    with pytest.raises(KilnError, match=r"^cache\.vae: .*unet-only holds no VAE"):
        find_vae(str(tmp_path / "unet-only"), "cache.vae")
