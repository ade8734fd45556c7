"""The cache stage on the demo set with the tiny-sd15 preset, at resolution 256 to keep it quick."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load as load_tensors

from pipeline.cache import prepare
from pipeline.errors import KilnError
from pipeline.latents import META_FIELDS, LatentStore
from pipeline.models import load_vae
from pipeline.params import BucketParams
from pipeline.tables import read_table
from tests.conftest import FAST, Project

ROOT = Path(__file__).resolve().parents[2]
@pytest.fixture
def project(demo_source, tmp_path) -> Project:
    shutil.copytree(demo_source, tmp_path / "raw")
    return Project(tmp_path).prepare()


@pytest.fixture(scope="module")
def cached(demo_source, tmp_path_factory) -> Project:
    """One encoded store shared by the read-only tests."""
    root = tmp_path_factory.mktemp("cached")
    shutil.copytree(demo_source, root / "raw")
    built = Project(root).prepare()
    built.cache()
    return built


def store_bytes(store: Path) -> dict[str, bytes]:
    return {
        path.relative_to(store).as_posix(): path.read_bytes()
        for path in sorted(store.rglob("*"))
        if path.is_file() and path.name not in ("summary.json", ".lock")
    }


def test_shapes_dtypes_masks_and_flips(cached):
    index = cached.index()
    images = {row["image_id"]: row for row in read_table(cached.scan_paths.images)}
    buckets = {row["image_id"]: row for row in read_table(cached.bucket_paths.buckets)}
    assert len(index) == 23  # 22 images + the flipped crop of the one whose yaml sets flip_p
    flipped = [row for row in index.values() if row["flip"]]
    assert [images[row["image_id"]]["path"] for row in flipped] == ["train/10_sks circle/circle_05.png"]
    for row in index.values():
        geometry = buckets[row["image_id"]]
        tensors = cached.store.read(row)
        shape = (4, geometry["bucket_h"] // 8, geometry["bucket_w"] // 8)
        assert tuple(tensors["mean"].shape) == shape == tuple(row["shape"])
        assert tensors["mean"].dtype == tensors["std"].dtype == torch.float16
        assert bool(row["has_mask"]) == ("mask" in tensors)
        if "mask" in tensors:
            assert tuple(tensors["mask"].shape) == (1, *shape[1:])
    masked = {images[row["image_id"]]["path"] for row in index.values() if row["has_mask"]}
    assert masked == {"train/10_sks circle/circle_03.png", "train/10_sks circle/circle_08.png"}


def test_flip_latents_adds_a_flipped_entry_for_every_image(project):
    result = project.cache(FAST.model_copy(update={"flip_latents": True}))
    assert result.encoded == 44
    index = project.index()
    by_image: dict[str, dict[bool, dict]] = {}
    for row in index.values():
        by_image.setdefault(row["image_id"], {})[row["flip"]] = row
    assert all(set(pair) == {False, True} for pair in by_image.values())


def test_latents_equal_a_direct_vae_call_on_the_same_crop(cached):
    loaded = load_vae("tiny-sd15", "model.base")
    index = cached.index()
    from pipeline.cache import plan

    entries = plan(
        read_table(cached.scan_paths.files), read_table(cached.bucket_paths.buckets), FAST, "lanczos",
        loaded.fingerprint, str(torch.float32),
    )
    assert {entry.cache_key for entry in entries} == set(index)
    for entry in entries[:6] + [e for e in entries if e.flip]:
        # An independent crop: PIL resize + crop + mirror, straight into the VAE.
        image = Image.open(cached.raw / entry.image["path"]).convert("RGB")
        g = entry.geometry
        crop = image.resize((g["resize_w"], g["resize_h"]), Image.Resampling.LANCZOS).crop(
            (g["crop_left"], g["crop_top"], g["crop_left"] + g["bucket_w"], g["crop_top"] + g["bucket_h"])
        )
        if entry.flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            expected = loaded.vae.encode(pixels).latent_dist
        stored = cached.store.read(index[entry.cache_key])
        # Stored in float16: one fp16 step at |x| < 4 is under 4e-3.
        torch.testing.assert_close(stored["mean"].float(), expected.mean[0].half().float(), atol=4e-3, rtol=0)
        torch.testing.assert_close(stored["std"].float(), expected.std[0].half().float(), atol=4e-3, rtol=0)
        assert np.allclose(prepare(entry, cached.raw, "lanczos", 8).pixels, pixels[0].numpy())


def test_rerun_encodes_nothing_and_keeps_bytes(project):
    project.cache()
    before = store_bytes(project.paths.store)
    again = project.cache()
    assert (again.encoded, again.reused, again.garbage) == (0, 23, 0)
    assert store_bytes(project.paths.store) == before
    summary = json.loads(project.store.summary_path.read_text())
    assert summary["encoded"] == 0 and summary["reused"] == 23


def test_adding_one_image_encodes_one_and_rewrites_only_the_shard_it_joins(project):
    project.cache()
    old = store_bytes(project.paths.store)
    Image.new("RGB", (700, 500), (10, 120, 200)).save(project.raw / "reg/1_shape/new_shape.png")
    project.prepare()
    result = project.cache()
    assert (result.encoded, result.reused) == (1, 23)
    new = store_bytes(project.paths.store)
    old_shards = {name for name in old if name.endswith(".tar")}
    new_shards = {name for name in new if name.endswith(".tar")}
    assert all(new[name] == old[name] for name in old_shards & new_shards)
    # the new latent's shard, and the one it replaced unless the new key starts a shard of its own
    assert len(new_shards - old_shards) in (1, 2) and len(old_shards - new_shards) <= 1
    assert len(old_shards & new_shards) >= len(old_shards) - 1 > 3


def test_changed_image_bytes_encode_one_and_leave_garbage(project):
    project.cache()
    target = project.raw / "reg/1_shape/shape_01.png"
    Image.new("RGB", (512, 512), (1, 2, 3)).save(target)
    project.prepare()
    result = project.cache()
    assert (result.encoded, result.reused, result.garbage) == (1, 22, 1)
    assert len(project.index()) == 24
    collected = project.cache(gc=True)
    assert (collected.collected, collected.garbage) == (1, 0)
    assert len(project.index()) == 23


def test_changing_the_resolution_reencodes_everything(project):
    project.cache()
    # (max_bucket_reso rises too: at 512 the 4:1 images keep their 512x128 bucket, rightly reusing it.)
    project.prepare(BucketParams(resolution=320, min_bucket_reso=128, max_bucket_reso=640))
    result = project.cache()
    assert (result.encoded, result.reused, result.garbage) == (23, 0, 23)


def test_shards_read_back_with_webdataset(cached):
    index = cached.index()
    urls = sorted(str(path) for path in cached.store.shard_files())
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        tensors = load_tensors(sample["safetensors"])
        seen[sample["__key__"]] = (meta, tensors)
    assert set(seen) == set(index)
    for key, (meta, tensors) in seen.items():
        assert meta["image_id"] == index[key]["image_id"] and meta["bucket"] == index[key]["bucket"]
        assert torch.equal(tensors["mean"], cached.store.read(index[key])["mean"])


def test_a_store_built_up_in_three_runs_is_byte_identical_to_a_fresh_build(project, tmp_path):
    project.cache()
    fresh = store_bytes(project.paths.store)
    assert len([name for name in fresh if name.endswith(".tar")]) > 6  # several shards per bucket: cuts act
    shutil.rmtree(project.paths.store)
    project.cache()
    assert store_bytes(project.paths.store) == fresh  # a rebuild from scratch

    late = ["reg/1_shape/shape_08.png", "train/10_sks circle/circle_02.png"]
    for name in late:
        shutil.move(project.raw / name, tmp_path / Path(name).name)
    shutil.rmtree(project.paths.store)
    project.prepare()
    assert project.cache().encoded == 21
    for name in late:  # two more runs, one image each
        shutil.move(tmp_path / Path(name).name, project.raw / name)
        project.prepare()
        assert project.cache().encoded == 1
    # Each late image was encoded in a batch of its own, padded to the same shape (the same bits as in
    # the fresh build), and joined the shard a fresh build puts it in: every file is byte-identical.
    assert store_bytes(project.paths.store) == fresh


def test_gc_leaves_the_store_a_fresh_build_of_the_live_keys_would_write(project, tmp_path):
    project.cache()
    fresh = store_bytes(project.paths.store)
    target = project.raw / "reg/1_shape/shape_01.png"
    shutil.copy(target, tmp_path / "shape_01.png")
    Image.new("RGB", (512, 512), (1, 2, 3)).save(target)
    project.prepare()
    assert project.cache().garbage == 1
    shutil.copy(tmp_path / "shape_01.png", target)
    project.prepare()
    again = project.cache(gc=True)
    assert (again.encoded, again.collected) == (0, 1)
    assert store_bytes(project.paths.store) == fresh


def test_a_corrupt_shard_is_detected_named_and_repaired(project, caplog):
    project.cache()
    row = next(iter(project.index().values()))
    shard = project.paths.store / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["offset"] + 200] ^= 0xFF
    shard.write_bytes(bytes(data))
    members = sum(1 for other in project.index().values() if other["shard"] == row["shard"])
    with caplog.at_level(logging.WARNING):
        result = project.cache()
    assert f"{shard}: checksum mismatch for {row['cache_key']}" in caplog.text
    assert (result.repaired, result.encoded) == (members, members)
    assert LatentStore(project.paths.store).verify(project.index()).damaged == []


def test_a_truncated_shard_is_repaired(project):
    project.cache()
    row = next(iter(project.index().values()))
    shard = project.paths.store / row["shard"]
    shard.write_bytes(shard.read_bytes()[:1000])
    assert project.cache().repaired >= 1
    assert len(project.index()) == 23


def json_header(offset: int, size: int) -> int:
    """Where the header of a sample's .json member starts: after its payload, padded to whole blocks."""
    return offset + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda row: json_header(row["offset"], row["size"]) + 3, id="name-of-the-2nd-header"),
        pytest.param(lambda row: json_header(row["offset"], row["size"]) + 150, id="checksum-of-the-2nd-header"),
        pytest.param(lambda row: json_header(row["offset"], row["size"]) + tarfile.BLOCKSIZE + 20, id="json-member"),
    ],
)
def test_damage_outside_the_payloads_is_detected_named_and_repaired(project, caplog, damage):
    project.cache()
    index = project.index()
    shard_of = [row["shard"] for row in index.values()]
    first = min((row for row in index.values() if shard_of.count(row["shard"]) > 1), key=lambda row: row["offset"])
    shard = project.paths.store / first["shard"]
    data = bytearray(shard.read_bytes())
    data[damage(first)] ^= 0x01
    shard.write_bytes(bytes(data))
    members = shard_of.count(first["shard"])
    with caplog.at_level(logging.WARNING):
        result = project.cache()
    assert f"{shard}: its tar headers or .json members do not match the index; its {members} latents" in caplog.text
    assert (result.repaired, result.encoded) == (members, members)
    index = project.index()
    seen = {}
    for sample in wds.WebDataset(sorted(str(path) for path in project.store.shard_files()), shardshuffle=False, empty_check=False):
        seen[sample["__key__"]] = json.loads(sample["json"])
    assert len(seen) == 23
    assert all(seen[key] == {name: row[name] for name in META_FIELDS} for key, row in index.items())


@pytest.mark.parametrize("damage", [lambda data: b"", lambda data: data[: len(data) // 2]], ids=["zero-bytes", "truncated"])
def test_a_damaged_index_is_rebuilt_from_the_shards_and_keys_rewritten(project, caplog, damage):
    project.cache()
    fresh = store_bytes(project.paths.store)
    for table in (project.store.index_path, project.paths.keys):
        table.write_bytes(damage(table.read_bytes()))
    with caplog.at_level(logging.WARNING):
        result = project.cache()
    assert f"{project.store.index_path}: unreadable (" in caplog.text
    assert (result.adopted, result.encoded, result.reused) == (23, 0, 23)
    assert store_bytes(project.paths.store) == fresh


@pytest.mark.parametrize("changed", ["reg/1_shape/shape_01.png", "train/10_sks circle/circle_03-masklabel.png"])
def test_an_image_changed_since_scan_is_a_failure_never_a_latent_under_its_old_key(project, changed):
    files = read_table(project.paths.files)
    image = next(row for row in files if changed in (row["path"], row["mask_path"]))
    Image.new("RGB", (300, 300), (1, 2, 3)).save(project.raw / changed)
    result = project.cache()
    assert result.failures == [
        f"{image['path']}: cannot read image (KilnError: {project.raw / changed} changed since `kiln scan`; "
        "rerun `kiln scan`)"
    ]
    index = project.index()
    assert len(index) == 22 and image["image_id"] not in {row["image_id"] for row in index.values()}


def test_a_second_writer_is_refused_with_a_clear_message(project):
    with project.store.lock(timeout=0):
        with pytest.raises(KilnError, match=r"another `kiln cache` \(pid \d+\) is writing this latent store"):
            project.cache()


def test_disk_full_removes_the_partial_shard_and_keeps_the_index_honest(project, monkeypatch):
    import errno

    import pipeline.latents as latents

    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == 5:  # each shard fsyncs its file, then its folder: this is the third shard's file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(latents.os, "fsync", fsync)
    with pytest.raises(KilnError, match="could not write this shard .*No space left on device"):
        project.cache()
    assert not list(project.paths.store.glob("*/.*.tmp"))
    finished = list(project.paths.store.glob("*/*.tar"))
    assert len(finished) == 2
    kept = sum(len(tarfile.open(path).getnames()) // 2 for path in finished)
    monkeypatch.setattr(latents.os, "fsync", real_fsync)
    result = project.cache()
    assert result.adopted == kept  # the shards finished before the failure were kept, not re-encoded
    assert result.encoded == 23 - kept and len(project.index()) == 23


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_complete_and_consistent(project, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "model:\n  base: tiny-sd15\ncache:\n  shard_max_count: 1\n  batch_size: 1\n  workers: 1\n"
    )
    command = [
        sys.executable, "-m", "stages.cache", "--params", str(params), "--buckets", str(project.paths.buckets),
        "--files", str(project.paths.files), "--data-root", str(project.raw), "--store", str(project.paths.store),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(project.paths.store.glob("*/*.tar"))) < 3:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    shards_at_kill = len(list(project.paths.store.glob("*/*.tar")))
    assert 3 <= shards_at_kill < 23, "the kill should land mid-run"
    assert subprocess.run(command, cwd=ROOT, capture_output=True).returncode == 0
    index = project.index()
    assert len(index) == 23
    assert LatentStore(project.paths.store).verify(index).damaged == []
    summary = json.loads(project.store.summary_path.read_text())
    assert summary["adopted"] >= 3 and summary["adopted"] + summary["encoded"] == 23


def test_tiny_sdxl_stores_time_id_fields(project):
    project.cache(base="tiny-sdxl")
    images = {row["image_id"]: row for row in read_table(project.scan_paths.images)}
    buckets = {row["image_id"]: row for row in read_table(project.bucket_paths.buckets)}
    for row in project.index().values():
        image, geometry = images[row["image_id"]], buckets[row["image_id"]]
        assert row["original_size"] == [image["height"], image["width"]]
        left = geometry["crop_left"]
        if row["flip"]:  # measured from the mirrored side
            left = geometry["resize_w"] - left - geometry["bucket_w"]
        assert row["crop_top_left"] == [geometry["crop_top"], left]
        assert row["target_size"] == [geometry["bucket_h"], geometry["bucket_w"]]


def test_vae_override_and_missing_model(project):
    with pytest.raises(KilnError, match="cache.vae: '/nowhere/vae' not found"):
        project.cache(FAST.model_copy(update={"vae": "/nowhere/vae"}))


@pytest.mark.slow
def test_distributed_two_processes_equal_one(project, tmp_path):
    single = Project(tmp_path / "single")
    shutil.copytree(project.root / "raw", single.raw)
    single.prepare().cache()
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  base: tiny-sd15\ncache:\n  shard_max_count: 4\n  workers: 1\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stages.cache", "--params", str(params),
            "--buckets", str(project.paths.buckets), "--files", str(project.paths.files),
            "--data-root", str(project.raw), "--store", str(project.paths.store),
        ],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    distributed, reference = project.index(), single.index()
    assert set(distributed) == set(reference)
    for key, row in reference.items():
        a, b = project.store.read(distributed[key]), single.store.read(row)
        assert set(a) == set(b)
        for name in a:
            # Ranks batch differently, so a value may land one fp16 step away (under 4e-3 at |x| < 4).
            torch.testing.assert_close(a[name].float(), b[name].float(), atol=4e-3, rtol=0)


def test_half_precision_nan_batch_is_reencoded_in_fp32():
    from types import SimpleNamespace

    from pipeline.cache import Encoder, Prepared
    from pipeline.models import LoadedVAE

    class HalfOverflowVAE(torch.nn.Module):
        """Returns inf when run in bfloat16, as an SDXL VAE can overflow in half precision."""

        config = SimpleNamespace(block_out_channels=[1, 1, 1, 1], scaling_factor=1.0)

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def encode(self, pixels):
            mean = pixels[:, :, ::8, ::8].mean(1, keepdim=True).repeat(1, 4, 1, 1) * self.scale
            if pixels.dtype == torch.bfloat16:
                mean = mean + float("inf")
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.ones_like(mean)))

    encoder = Encoder(LoadedVAE(HalfOverflowVAE(), "x", "stub"), "cpu", torch.bfloat16, torch.float16, batch_size=4)
    batch = [Prepared(None, np.full((3, 16, 16), 0.5, np.float32), None) for _ in range(2)]
    outputs = encoder(batch)
    assert encoder.nan_fallbacks == 2  # both samples overflowed; each was redone in float32
    assert torch.equal(outputs[0]["mean"], torch.full((4, 2, 2), 0.5, dtype=torch.float16))


def test_a_rerun_with_nothing_to_encode_never_loads_the_vae(project, monkeypatch):
    from pipeline.models import VAESource

    project.cache()

    def refuse(self):
        raise AssertionError("the VAE was loaded")

    monkeypatch.setattr(VAESource, "load", refuse)
    assert project.cache().reused == 23


def test_a_latent_does_not_depend_on_its_batch_neighbours():
    from pipeline.cache import Encoder, Prepared

    loaded = load_vae("tiny-sd15", "model.base")
    # At 256 px the CPU kernels picked for a batch of 1 and a batch of 4 round differently (measured here:
    # every latent differed without the fixed batch shape).
    encoder = Encoder(loaded, "cpu", torch.float32, torch.float16, batch_size=4)
    rng = np.random.default_rng(0)
    images = [Prepared(None, rng.uniform(-1, 1, (3, 256, 256)).astype(np.float32), None) for _ in range(4)]
    alone = encoder(images[:1])[0]
    together = encoder(images)[0]
    shuffled = encoder([images[2], images[0], images[3]])[1]
    for other in (together, shuffled):
        assert torch.equal(other["mean"], alone["mean"]) and torch.equal(other["std"], alone["std"])
