"""The latent store's reader: one checked read path for the loader, the validator and compaction."""

import pickle

import pytest

from pipeline.errors import KilnError
from pipeline.latents import LatentStore, Sample, checked, is_remote


def store_with_two(tmp_path):
    import torch

    store = LatentStore(tmp_path / "latents")
    samples = [Sample(key, {"mean": torch.full((4, 2, 2), float(n))}, {"bucket": "64x64"}) for n, key in enumerate(["a", "b"])]
    return store, store.write_shard("64x64", samples)


def test_reads_are_checked_against_the_index(tmp_path):
    store, rows = store_with_two(tmp_path)
    assert store.read(rows["b"])["mean"][0, 0, 0].item() == 1.0
    shard = store.root / rows["a"]["shard"]
    data = bytearray(shard.read_bytes())
    data[rows["b"]["offset"] + rows["b"]["size"] - 1] ^= 0xFF  # flip one byte of sample b
    shard.write_bytes(bytes(data))
    assert store.read(rows["a"])["mean"][0, 0, 0].item() == 0.0  # a is intact
    with pytest.raises(KilnError, match=r"shard-.*\.tar: latent b does not match its checksum; .*Rerun `kiln cache`"):
        store.read(rows["b"])


def test_a_kept_open_reader_reuses_its_file_and_travels_to_workers_without_it(tmp_path):
    store, rows = store_with_two(tmp_path)
    reader = LatentStore(store.root, keep_open=True)
    reader.read(rows["a"])
    reader.read(rows["b"])
    assert list(reader._handles) == [rows["a"]["shard"]]  # one open file for the shard
    copy = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker receives
    assert copy._handles == {} and copy.read(rows["b"])["mean"][0, 0, 0].item() == 1.0


def test_checked_names_where_the_payload_came_from():
    row = {"cache_key": "k", "sha256": "0" * 64}
    with pytest.raises(KilnError, match=r"^s3://bucket/shard-1\.tar: latent k does not match its checksum"):
        checked(b"payload", row, "s3://bucket/shard-1.tar")


def test_remote_stores_are_urls_and_pipes():
    assert is_remote("s3://bucket/latents") and is_remote("https://host/latents") and is_remote("pipe:curl -s x")
    assert not is_remote("data/latents") and not is_remote("/abs/data/latents")


def test_compaction_moves_the_index_but_not_the_manifest(tmp_path):
    import torch

    from pipeline.tables import read_table

    store = LatentStore(tmp_path / "latents")
    rows = {}
    for n, key in enumerate(["a", "b", "c", "d"]):  # one shard per sample, as incremental runs leave them
        meta = {"kind": "latent", "image_id": key, "flip": False, "bucket": "64x64", "shape": [4, 2, 2], "dtype": "float32",
                "has_mask": False, "original_size": [16, 16], "crop_top_left": [0, 0], "target_size": [16, 16]}
        sample = Sample(key, {"mean": torch.full((4, 2, 2), float(n))}, meta)
        rows.update(store.write_shard("64x64", [sample]))
    store.write_index(rows)
    index, manifest = store.index_path.read_bytes(), store.manifest_path.read_bytes()
    assert read_table(store.manifest_path) == [{"cache_key": k, "sha256": rows[k]["sha256"]} for k in "abcd"]
    packed = store.compact(rows, {"a", "b", "c", "d"}, max_count=4, max_bytes=1 << 20)  # `kiln cache --gc`
    assert len({row["shard"] for row in packed.values()}) == 1
    assert store.index_path.read_bytes() != index  # new shard, new offsets
    assert store.manifest_path.read_bytes() == manifest  # same latents, same bytes: balance and train stay put
