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


def test_a_ckpt_holding_python_objects_is_refused_without_the_unsafe_advice(tmp_path):
    import pickle

    import torch

    from pipeline.models import pickle_error

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):  # unpickled, this calls open(marker, "w"): an attacker's code would run here
            return (open, (str(marker), "w"))

    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"first_stage_model.encoder.conv_in.bias": torch.zeros(4)}, "callback": Payload()}, checkpoint)
    expected = (
        f"model.base: {checkpoint} holds pickled Python objects (io.open) that Kiln does not load; "
        "convert it to .safetensors with a tool you trust"
    )
    with pytest.raises(KilnError) as error:
        load_vae(str(checkpoint), "model.base")  # diffusers re-raises torch's refusal as an OSError
    assert str(error.value) == expected
    # torch's own refusal, as the trainer's single-file loader meets it: its advice (weights_only=False) is not relayed.
    with pytest.raises(pickle.UnpicklingError) as refusal:
        torch.load(checkpoint, weights_only=True)
    assert "weights_only" in str(refusal.value)
    assert str(pickle_error("model.base", checkpoint, refusal.value)) == expected
    # The trainer's model.base loader says the same, whichever of its reads meets the pickle first.
    from pipeline.sd import load_components

    with pytest.raises(KilnError) as error:
        load_components(str(checkpoint), "model.base")
    assert str(error.value) == expected
    assert "weights_only" not in expected and not marker.exists()
