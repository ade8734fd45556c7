import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.balance import run as run_balance
from pipeline.errors import KilnError
from pipeline.loader import LatentLoader, epoch_counts, epoch_schedule, process_caption, rank_slice
from pipeline.params import BalanceParams, CacheParams, TrainParams
from pipeline.tables import read_table
from tests.conftest import Project, paths_of


def plan_rows(spec):
    """spec: (bucket, batch_id, repeats) per image."""
    return [{"bucket": bucket, "batch_id": batch_id, "repeats": repeats, "image_id": f"i{n}"} for n, (bucket, batch_id, repeats) in enumerate(spec)]


PLAN = plan_rows([("a", None, 3), ("a", None, 2), ("b", None, 5), ("b", "g", 4), ("b", "g", 1), ("c", None, 1)])


def test_fractional_multiply_averages_out():
    counts = np.array([epoch_counts([2.3, 0.5, 1.0], seed=7, epoch=e) for e in range(4000)])
    assert set(counts[:, 0]) == {2, 3} and set(counts[:, 2]) == {1}
    assert counts.mean(axis=0) == pytest.approx([2.3, 0.5, 1.0], abs=0.03)


@pytest.mark.parametrize("remainder", ["fill", "drop", "partial"])
def test_schedule_properties(remainder):
    batches = epoch_schedule(PLAN, seed=1, epoch=0, batch_size=2, remainder=remainder)
    for batch in batches:
        assert len({PLAN[row]["bucket"] for row in batch.rows}) == 1
        assert len({PLAN[row]["batch_id"] for row in batch.rows}) == 1  # batch_id groups stay together
        assert {PLAN[row]["bucket"] for row in batch.rows} == {batch.bucket}
    sizes = Counter(len(batch.rows) for batch in batches)
    counts = Counter(row for batch in batches for row in batch.rows)
    if remainder == "partial":
        assert counts == {0: 3, 1: 2, 2: 5, 3: 4, 4: 1, 5: 1}  # each image exactly its repeats
        assert sizes == {2: 6, 1: 4}
    if remainder == "drop":
        assert set(sizes) == {2} and sum(sizes.values()) == 6
    if remainder == "fill":
        assert set(sizes) == {2} and sum(sizes.values()) == 10
        for row, count in {0: 3, 1: 2, 2: 5, 3: 4, 4: 1, 5: 1}.items():
            assert counts[row] >= count


def test_same_seed_same_schedule_other_seed_or_epoch_differs():
    first = epoch_schedule(PLAN, 1, 0, 2, "fill")
    assert epoch_schedule(PLAN, 1, 0, 2, "fill") == first
    assert epoch_schedule(PLAN, 2, 0, 2, "fill") != first
    assert epoch_schedule(PLAN, 1, 1, 2, "fill") != first


def test_two_ranks_disjoint_and_equal_length():
    for batch_size in (1, 3):
        batches = epoch_schedule(PLAN, 1, 0, batch_size, "partial")
        zero, one = rank_slice(batches, 0, 2), rank_slice(batches, 1, 2)
        assert len(zero) == len(one) == len(batches) // 2
        # Rank r takes schedule positions r, r + 2, r + 4 ...: disjoint by construction, checked here.
        positions = {0: [batches.index(b) for b in batches[0::2]][: len(zero)], 1: [batches.index(b) for b in batches[1::2]][: len(one)]}
        assert not set(positions[0]) & set(positions[1])
        assert [b.rows for b in zero] == [batches[i].rows for i in positions[0]]
        assert [b.rows for b in one] == [batches[i].rows for i in positions[1]]
        assert [b.index for b in zero] == list(range(len(zero)))


def test_caption_processing_is_kohya_order_and_seeded():
    text = "sks dog, red collar, grass, sunny, park"
    same = [process_caption(text, np.random.default_rng(5), 0.0, True, 1, 0.0) for _ in range(2)]
    assert same[0] == same[1]
    assert same[0].startswith("sks dog, ") and sorted(same[0].split(", ")) == sorted(text.split(", "))
    shuffled = {process_caption(text, np.random.default_rng(seed), 0.0, True, 1, 0.0) for seed in range(30)}
    assert len(shuffled) > 5 and all(s.startswith("sks dog, ") for s in shuffled)
    assert process_caption(text, np.random.default_rng(0), 1.0, True, 1, 0.0) == ""
    dropped = [process_caption(text, np.random.default_rng(seed), 0.0, False, 2, 0.5) for seed in range(400)]
    assert all(d.startswith("sks dog, red collar") for d in dropped)
    kept_share = np.mean([len(d.split(", ")) - 2 for d in dropped]) / 3
    assert kept_share == pytest.approx(0.5, abs=0.06)
    assert process_caption(text, np.random.default_rng(0), 0.0, False, 0, 0.0) == text


@pytest.fixture(scope="module")
def demo(demo_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    shutil.copytree(demo_source, root / "raw")
    project = Project(root).prepare()
    project.cache(CacheParams(shard_max_count=4, workers=2, flip_latents=True))
    run_balance(BalanceParams(), TrainParams(), paths_of(project, root / "plan"))
    return project, root / "plan" / "plan.parquet"


def batches_of(loader, limit=None):
    out = []
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["image_ids"] == y["image_ids"] and x["captions"] == y["captions"]
        assert torch.equal(x["latents"], y["latents"]) and torch.equal(x["time_ids"], y["time_ids"])


def test_batches_carry_what_training_needs(demo):
    project, plan = demo
    loader = LatentLoader(plan, project.paths.store, TrainParams(batch_size=4, workers=0, flip_p=0.5))
    batches = batches_of(loader)
    first = batches[0]
    assert first["latents"].dtype == torch.float32 and first["latents"].shape[:2] == (4, 4)
    assert first["is_reg"].dtype == torch.bool and first["loss_weight"].dtype == torch.float32
    assert first["time_ids"].shape == (4, 6)
    assert sum(len(b["image_ids"]) for b in batches) >= 225
    assert any(b["masks"] is not None for b in batches)
    assert loader.state_dict() == {"epoch": 1, "batch_index": 0, "seed": 42}


def test_mean_sampling_is_the_stored_mean_and_sample_differs(demo):
    project, plan = demo
    mean = batches_of(LatentLoader(plan, project.paths.store, TrainParams(workers=0, latent_sampling="mean")), 1)[0]
    sample = batches_of(LatentLoader(plan, project.paths.store, TrainParams(workers=0)), 1)[0]
    assert mean["image_ids"] == sample["image_ids"]
    assert not torch.equal(mean["latents"], sample["latents"])
    rows = {row["image_id"]: row for row in read_table(plan)}
    index = {row["cache_key"]: row for row in read_table(project.paths.store / "index.parquet")}
    stored = project.store.read(index[rows[mean["image_ids"][0]]["cache_key"]])
    assert torch.equal(mean["latents"][0], stored["mean"].float())


def test_workers_do_not_change_the_batches(demo):
    project, plan = demo
    zero = batches_of(LatentLoader(plan, project.paths.store, TrainParams(batch_size=3, workers=0, shuffle_tags=True)))
    two = batches_of(LatentLoader(plan, project.paths.store, TrainParams(batch_size=3, workers=2, shuffle_tags=True)))
    same_batches(zero, two)


def test_resume_yields_exactly_the_uninterrupted_batches(demo, tmp_path):
    project, plan = demo
    cfg = TrainParams(batch_size=3, workers=0, flip_p=0.5, cond_dropout=0.2, shuffle_tags=True)
    whole = LatentLoader(plan, project.paths.store, cfg)
    reference = batches_of(whole) + batches_of(whole)  # two epochs
    interrupted = LatentLoader(plan, project.paths.store, cfg)
    head = batches_of(interrupted, limit=10)
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "batch_index": 10, "seed": 42}
    restored = LatentLoader(plan, project.paths.store, cfg)
    restored.load_state_dict(state)
    tail = batches_of(restored) + batches_of(restored)
    same_batches(head + tail, reference)


def test_minibatch_repeat_and_write_schedule(demo, tmp_path):
    project, plan = demo
    cfg = TrainParams(batch_size=2, workers=0, minibatch_repeat=3, write_schedule=True)
    batch = batches_of(LatentLoader(plan, project.paths.store, cfg, logs_dir=tmp_path), 1)[0]
    assert len(batch["image_ids"]) == 6
    assert batch["image_ids"][0] == batch["image_ids"][1] == batch["image_ids"][2]
    schedule = (tmp_path / "schedule_epoch_0_rank_0.tsv").read_text().splitlines()
    assert schedule[0] == "batch\tbucket\timage_ids" and len(schedule) > 50


def test_flip_without_flipped_latents_names_cache_flip_latents(demo_source, tmp_path):
    shutil.copytree(demo_source, tmp_path / "raw")
    project = Project(tmp_path).prepare()
    project.cache()
    run_balance(BalanceParams(), TrainParams(), paths_of(project, tmp_path / "plan"))
    with pytest.raises(KilnError, match="set cache.flip_latents: true and rerun `kiln cache`"):
        LatentLoader(tmp_path / "plan/plan.parquet", project.paths.store, TrainParams(flip_p=0.5))


def test_corrupt_shard_gives_the_named_error(demo, tmp_path):
    project, plan = demo
    store = tmp_path / "latents"
    shutil.copytree(project.paths.store, store)
    index = read_table(store / "index.parquet")
    for row in index:
        shard = store / row["shard"]
        data = bytearray(shard.read_bytes())
        data[row["offset"] + 100] ^= 0xFF
        shard.write_bytes(bytes(data))
    for workers in (0, 2):  # from a DataLoader worker too: the same one line, not the worker's traceback
        loader = LatentLoader(plan, store, TrainParams(workers=workers))
        with pytest.raises(KilnError, match=r"^\S+\.tar: latent \w+ does not match its checksum; the shard is damaged\. Rerun `kiln cache`") as caught:
            batches_of(loader, 1)
        assert "\n" not in str(caught.value)


def test_streaming_loader_for_remote_shards(demo):
    from pipeline.loader import StreamingLatentLoader

    project, plan = demo
    index_path = project.paths.store / "index.parquet"
    cfg = TrainParams(batch_size=3, flip_p=0.5)
    loader = StreamingLatentLoader(plan, index_path, str(project.paths.store), cfg)
    batches = list(loader)
    rows = read_table(plan)
    counts = epoch_counts([r["repeats"] for r in sorted(rows, key=lambda r: r["image_id"])], 42, 0)
    assert sum(len(b["image_ids"]) for b in batches) == pytest.approx(sum(counts), abs=10)
    shapes = {tuple(b["latents"].shape[2:]) for b in batches}  # a batch is one tensor: one size
    expected = {(int(h) // 8, int(w) // 8) for w, h in (row["bucket"].split("x") for row in rows)}
    assert shapes == expected  # every bucket streams
    again = list(StreamingLatentLoader(plan, index_path, str(project.paths.store), cfg))
    same_batches(batches, again)
    # Two ranks stream disjoint shards.
    zero = StreamingLatentLoader(plan, index_path, str(project.paths.store), cfg, rank=0, world=2)
    one = StreamingLatentLoader(plan, index_path, str(project.paths.store), cfg, rank=1, world=2)
    for bucket in {row["bucket"] for row in rows}:
        assert not set(zero._shards(bucket)) & set(one._shards(bucket))


def test_a_damaged_index_or_plan_is_named_with_the_stage_to_rerun(demo, tmp_path):
    project, plan = demo
    store = tmp_path / "latents"
    shutil.copytree(project.paths.store, store)
    (store / "index.parquet").write_bytes(b"")
    with pytest.raises(KilnError, match=rf"^{store}/index\.parquet: damaged, not a readable Parquet file \(.*\); rerun `kiln cache`$"):
        LatentLoader(plan, store, TrainParams(workers=0))
    broken_plan = tmp_path / "plan.parquet"
    broken_plan.write_bytes(plan.read_bytes()[:-50])
    with pytest.raises(KilnError, match=rf"^{broken_plan}: damaged, not a readable Parquet file \(.*\); rerun `kiln balance`$"):
        LatentLoader(broken_plan, project.paths.store, TrainParams(workers=0))


def test_streaming_loader_names_a_corrupt_shard(demo, tmp_path):
    from pipeline.loader import StreamingLatentLoader

    project, plan = demo
    store = tmp_path / "latents"
    shutil.copytree(project.paths.store, store)
    for row in read_table(store / "index.parquet"):
        shard = store / row["shard"]
        data = bytearray(shard.read_bytes())
        data[row["offset"] + 100] ^= 0xFF
        shard.write_bytes(bytes(data))
    loader = StreamingLatentLoader(plan, store / "index.parquet", str(store), TrainParams(batch_size=2))
    with pytest.raises(KilnError, match=r"\.tar: latent [0-9a-f]+ does not match its checksum"):
        list(loader)


def test_make_loader_picks_streaming_for_urls(demo):
    from pipeline.loader import StreamingLatentLoader, make_loader

    project, plan = demo
    index = project.paths.store / "index.parquet"
    assert isinstance(make_loader(plan, project.paths.store, index, TrainParams()), LatentLoader)
    assert isinstance(make_loader(plan, "s3://bucket/latents", index, TrainParams()), StreamingLatentLoader)


def test_streaming_loader_length_matches_what_it_yields(demo):
    from pipeline.loader import StreamingLatentLoader

    project, plan = demo
    loader = StreamingLatentLoader(plan, project.paths.store / "index.parquet", str(project.paths.store), TrainParams(batch_size=4, bucket_remainder="partial"))
    expected = len(loader)
    assert expected == len(list(loader))


def test_both_loaders_seed_a_batch_by_its_position(demo):
    # The step's draws come from (seed, epoch, batch number) whichever loader is used, and a restored
    # loader gives the generator the uninterrupted one would have.
    from pipeline.loader import StreamingLatentLoader, batch_generator

    def draws(generator):
        return torch.rand(4, generator=generator)

    project, plan = demo
    cfg = TrainParams(batch_size=2, workers=0, seed=9)
    local = LatentLoader(plan, project.paths.store, cfg)
    streaming = StreamingLatentLoader(plan, project.paths.store / "index.parquet", str(project.paths.store), cfg)
    for loader in (local, streaming):
        for number, _ in enumerate(loader, start=1):
            assert torch.equal(draws(loader.generator()), draws(batch_generator(9, 0, number)))
            if number == 3:
                break
    restored = LatentLoader(plan, project.paths.store, cfg)
    restored.load_state_dict({"epoch": 0, "batch_index": 2, "seed": 9})
    next(iter(restored))
    assert torch.equal(draws(restored.generator()), draws(batch_generator(9, 0, 3)))
    assert not torch.equal(draws(batch_generator(9, 0, 3)), draws(batch_generator(9, 1, 3)))
