"""The latent store: one checked read path, and a layout that depends on the keys alone."""

import pickle
import random

import pytest

from pipeline.errors import KilnError
from pipeline.latents import LatentStore, Sample, checked, is_remote, layout


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


def sample(key: str, value: float, group: str = "64x64") -> Sample:
    import torch

    meta = {"kind": "latent", "image_id": key, "flip": False, "bucket": group, "shape": [4, 2, 2], "dtype": "float32",
            "has_mask": False, "original_size": [16, 16], "crop_top_left": [0, 0], "target_size": [16, 16]}
    return Sample(key, {"mean": torch.full((4, 2, 2), value)}, meta)


def keyed(count: int, seed: int) -> list[str]:
    generator = random.Random(seed)
    return sorted(f"{generator.getrandbits(256):064x}" for _ in range(count))


def runs_of(keys: list[str], max_count: int, max_bytes: int = 1 << 40, size: int = 1) -> set[tuple[str, ...]]:
    return {tuple(keys[start:stop]) for start, stop in layout(keys, [size] * len(keys), max_count, max_bytes)}


def test_verify_finds_a_change_to_any_byte_of_a_shard(tmp_path):
    # Headers, .json members and padding included: a reader depends on all of them, not the payloads alone.
    store = LatentStore(tmp_path / "latents")
    rows = store.write_shard("64x64", [sample("a", 0.0), sample("b", 1.0)])
    shard = store.root / rows["a"]["shard"]
    intact = shard.read_bytes()
    assert store.verify(rows).damaged == []
    for position in range(0, len(intact), 7):
        damaged = bytearray(intact)
        damaged[position] ^= 0x01
        shard.write_bytes(bytes(damaged))
        assert store.verify(rows).damaged == [rows["a"]["shard"]], position
    shard.write_bytes(intact + bytes(512))
    assert store.verify(rows).damaged == [rows["a"]["shard"]]


def test_layout_covers_every_key_in_order_within_the_caps():
    keys = keyed(500, seed=1)
    runs = layout(keys, [100] * len(keys), max_count=40, max_bytes=2000)
    assert runs[0][0] == 0 and runs[-1][1] == 500
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(runs, runs[1:], strict=False))
    assert max(stop - start for start, stop in runs) == 20  # 2000 bytes of 100-byte samples
    assert len(runs) > 500 / 20  # content-defined cuts come before the byte cap too
    single = layout(["a", "b"], [10, 10], max_count=1, max_bytes=1 << 20)
    assert single == [(0, 1), (1, 2)]


def test_one_new_key_moves_only_the_shard_it_joins():
    keys = keyed(2000, seed=2)
    before = runs_of(keys, max_count=100)
    assert 2000 / 40 < len(before) < 2000 / 10  # about one cut in 25 keys
    for extra in keyed(50, seed=3):
        after = runs_of(sorted(keys + [extra]), max_count=100)
        added, removed = after - before, before - after
        # Only the run the key joined is redrawn (with the count cap's cuts inside its content-defined span):
        # the new runs hold exactly the old runs' keys plus the new one, and every other run stays.
        assert sorted(key for run in added for key in run) == sorted([extra, *(key for run in removed for key in run)])
        assert sum(len(run) for run in removed) < 300 and len(after & before) >= len(before) - 4


def test_settle_lays_out_a_store_built_in_three_runs_as_one_built_at_once(tmp_path):
    keys = keyed(60, seed=4)
    values = {key: float(n) for n, key in enumerate(keys)}
    fresh = LatentStore(tmp_path / "fresh")
    fresh.settle(fresh.write_shard("64x64", [sample(key, values[key]) for key in keys]) | {}, max_count=12, max_bytes=1 << 20)
    built = LatentStore(tmp_path / "built")
    rows: dict = {}
    for part in (keys[::3], keys[1::3], keys[2::3]):  # each run writes its new samples to shards of their own
        rows.update(built.write_shard("64x64", [sample(key, values[key]) for key in part]))
        rows = built.settle(rows, max_count=12, max_bytes=1 << 20)

    def files(store):
        return {path.relative_to(store.root).as_posix(): path.read_bytes() for path in sorted(store.root.rglob("*")) if path.is_file()}

    assert len(fresh.shard_files()) > 2
    assert files(built) == files(fresh)


def test_settle_keeps_the_shards_already_in_place(tmp_path):
    keys = keyed(40, seed=5)
    store = LatentStore(tmp_path / "latents")
    rows = store.settle(store.write_shard("64x64", [sample(key, 1.0) for key in keys]), max_count=12, max_bytes=1 << 20)
    stamps = {path: path.stat().st_ino for path in store.shard_files()}
    extra = keyed(1, seed=6)[0]
    rows.update(store.write_shard("64x64", [sample(extra, 2.0)]))
    rows = store.settle(rows, max_count=12, max_bytes=1 << 20)
    kept = {path for path in store.shard_files() if stamps.get(path) == path.stat().st_ino}
    assert len(kept) >= len(stamps) - 1  # only the shard the new key joined was rewritten
    assert len(store.shard_files()) - len(kept) in (1, 2)
    assert set(rows) == set(keys) | {extra}


def test_settling_moves_the_index_but_not_the_manifest(tmp_path):
    from pipeline.tables import read_table

    store = LatentStore(tmp_path / "latents")
    rows = {}
    for n, key in enumerate(["a", "b", "c", "d"]):  # one shard per sample, as a two-process run may leave them
        rows.update(store.write_shard("64x64", [sample(key, float(n))]))
    store.write_index(rows)
    index, manifest = store.index_path.read_bytes(), store.manifest_path.read_bytes()
    assert read_table(store.manifest_path) == [{"cache_key": k, "sha256": rows[k]["sha256"]} for k in "abcd"]
    settled = store.settle(rows, max_count=1000, max_bytes=1 << 20)
    assert len({row["shard"] for row in settled.values()}) == 1
    assert len(store.shard_files()) == 1  # the four old shards are gone
    assert store.index_path.read_bytes() != index  # new shard, new offsets
    assert store.manifest_path.read_bytes() == manifest  # same latents, same bytes: balance and train stay put
