import pytest
from PIL import Image

from pipeline.errors import KilnError
from pipeline.inference import cache_key, chunks, fingerprint, load_rgb, resolve_model, run_batched
from pipeline.presets import build_tiny_wd14
from tests.conftest import write_image


def test_load_rgb_applies_exif_and_composites_alpha_on_white(tmp_path):
    rotated = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "r.jpg").size == (10, 30)
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    transparent.save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)
    write_image(tmp_path / "s.png", size=(4, 4), mode="I;16", colour=65535)
    assert load_rgb(tmp_path / "s.png").getpixel((0, 0)) == (255, 255, 255)


def test_run_batched_retries_a_failed_batch_image_by_image():
    calls = []

    def infer(batch):
        calls.append(list(batch))
        if 3 in batch:
            raise RuntimeError("bad input")
        return [value * 10 for value in batch]

    outcomes = list(run_batched(chunks([1, 2, 3, 4, 5], 4), lambda x: x, infer, workers=2, label=lambda x: f"img{x}", desc="t"))
    assert [(o.item, o.output) for o in outcomes] == [(1, 10), (2, 20), (3, None), (4, 40), (5, 50)]
    assert outcomes[2].error == "img3: model failed (RuntimeError: bad input)"
    assert calls == [[1, 2, 3, 4], [1], [2], [3], [4], [5]]


def test_run_batched_reports_an_unreadable_image_and_goes_on():
    def load(x):
        if x == 2:
            raise OSError("truncated")
        return x

    outcomes = list(run_batched([[1, 2, 3]], load, lambda b: b, workers=1, label=str, desc="t"))
    assert [(o.item, o.output, o.error) for o in outcomes] == [
        (2, None, "2: cannot read image (OSError: truncated)"), (1, 1, None), (3, 3, None),
    ]


def test_missing_local_model_names_the_path_and_the_presets_that_fit_the_key(tmp_path):
    with pytest.raises(KilnError) as caught:
        resolve_model(str(tmp_path / "nope"), "caption.model")
    assert str(caught.value) == (
        f"caption.model: '{tmp_path / 'nope'}' not found. Point caption.model at a local model folder, "
        "a hub id (org/name) or a preset (tiny-blip)."
    )
    with pytest.raises(KilnError, match=r"a hub id \(org/name\) or a preset \(tiny-wd14, tiny-clip\)\.$"):
        resolve_model(str(tmp_path / "nope"), "tag.model")


@pytest.mark.parametrize("spec", ["/models/sd15.safetensors", "models/sd15.safetensors"])
def test_missing_base_checkpoint_is_not_found_and_single_files_are_accepted(spec):
    # `models/sd15.safetensors` has one slash, but is a missing file, not a hub id to download.
    with pytest.raises(KilnError) as caught:
        resolve_model(spec, "model.base")
    assert str(caught.value) == (
        f"model.base: '{spec}' not found. Point model.base at a diffusers model folder, a single .safetensors/.ckpt "
        "file, a hub id (org/name) or a preset (tiny-sd15, tiny-sdxl)."
    )


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"weights")
    with pytest.raises(KilnError, match=r"^model.base: '.*model.bin' is a file Kiln cannot load as a model\. Point"):
        resolve_model(str(tmp_path / "model.bin"), "model.base")


def test_uncached_hub_id_offline_says_how_to_provide_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KilnError) as caught:
        resolve_model("kiln-test/not-a-model", "tag.model")
    message = str(caught.value)
    assert message.startswith(
        "tag.model: 'kiln-test/not-a-model' not found: no such local folder, not in the local hub cache, and it "
        "could not be downloaded ("
    )
    assert "hf download kiln-test/not-a-model --local-dir /models/not-a-model" in message


def test_fingerprint_changes_with_weights_not_with_readme(tmp_path):
    build_tiny_wd14(tmp_path)
    first = fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("notes")
    assert fingerprint(tmp_path) == first
    (tmp_path / "selected_tags.csv").write_text("tag_id,name,category\n0,x,0\n")
    assert fingerprint(tmp_path) != first


def test_a_fingerprint_is_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    import hashlib
    import os

    import pipeline.inference as inference

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights v1")
    first = fingerprint(weights)
    assert first == hashlib.sha256(b"weights v1").hexdigest()  # the value is the file's own hash, as before
    assert (tmp_path / "cache" / "fingerprints.json").is_file()
    hashed = []
    monkeypatch.setattr(inference, "_hash_files", lambda folder, files: hashed.append(files) or "recomputed")
    assert fingerprint(weights) == first and hashed == []  # remembered: nothing read
    # Same size, same mtime: taken as unchanged (make's trust); a new mtime is hashed again.
    stat = weights.stat()
    weights.write_bytes(b"weights v2")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(weights) == first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert fingerprint(weights) == "recomputed" and len(hashed) == 1
    # A damaged record is recomputed, never an error.
    (tmp_path / "cache" / "fingerprints.json").write_text("{not json")
    assert fingerprint(weights) == "recomputed"


def test_cache_key_depends_on_every_field():
    base = cache_key(image_id="a", model="m", beams=1)
    assert base == cache_key(beams=1, model="m", image_id="a")
    assert base != cache_key(image_id="a", model="m", beams=2)
