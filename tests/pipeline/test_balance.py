import re
import shutil
from pathlib import Path

import pytest

from pipeline.balance import BalancePaths, balance_reg_repeats, build_plan, compose_caption, run
from pipeline.errors import KilnError
from pipeline.params import BalanceParams, TrainParams
from pipeline.tables import read_table
from tests.conftest import Project, paths_of


@pytest.mark.parametrize(
    ("reg", "target", "expected", "unused"),
    [
        # reg fewer than train: T = 10 over 3 reg images of 1 repeat -> 3, then +1 each in turn.
        ([1, 1, 1], 10, [4, 3, 3], 0),
        # reg more than train: T = 2 is met by the first two; the other three are unused.
        ([1, 1, 1, 1, 1], 2, [1, 1, 0, 0, 0], 3),
        # zero reg images.
        ([], 10, [], 0),
        # two reg folders, repeats 2 and 1, in path order A1 A2 B1: 2+2+1 = 5, then 3,3,2 = 8, then 4,4 = 10.
        ([2, 2, 1], 10, [4, 4, 2], 0),
        # the first pass overshoots: registered with its own repeats, as kohya does.
        ([3, 3], 4, [3, 3], 0),
    ],
)
def test_kohya_reg_balancing(reg, target, expected, unused):
    assert balance_reg_repeats(reg, target) == (expected, unused)


def test_compose_caption():
    cfg = BalanceParams(caption_prefix="ohwx", caption_suffix="best quality")
    assert compose_caption("a dog, red", ["red", "grass"], "sks dog", cfg) == "ohwx, a dog, red, grass, best quality"
    assert compose_caption("", [], "sks dog", BalanceParams()) == "sks dog"
    cfg = BalanceParams(caption_template="{class_tokens}, {caption}")
    assert compose_caption("a dog", ["x"], "sks dog", cfg) == "sks dog, a dog"


def test_unknown_template_field_is_a_params_error():
    from pipeline.errors import ParamsError
    from pipeline.params import validate_params

    with pytest.raises(ParamsError, match=r"balance.caption_template: unknown field \{tag\}"):
        validate_params({"balance": {"caption_template": "{caption}, {tag}"}})


@pytest.fixture(scope="module")
def project(demo_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("balance")
    shutil.copytree(demo_source, root / "raw")
    built = Project(root).prepare()
    built.cache()
    return built


def test_plan_from_the_demo(project, tmp_path):
    result = run(BalanceParams(prior_loss_weight=0.5), TrainParams(batch_size=2), paths_of(project, tmp_path))
    rows = {row["path"]: row for row in read_table(tmp_path / "plan.parquet")}
    assert len(rows) == 22
    assert rows["train/10_sks circle/circle_01.png"]["repeats"] == 10
    assert rows["train/5_sks square/square_04.png"]["repeats"] == 7.5  # 5 repeats x multiply 1.5
    assert rows["train/5_sks square/square_04.png"]["loss_weight"] == 0.8  # yaml loss_scale
    assert rows["reg/1_shape/shape_01.png"]["loss_weight"] == 0.5
    assert rows["train/10_sks circle/circle_05.png"]["flip_cache_key"] is not None
    # T = 8 x 10 + 5 x 5 + 7.5 = 112.5; 8 reg images reach it after 14 passes: 113.
    assert sum(row["repeats"] for row in rows.values() if row["is_reg"]) == 113
    assert result.summary["samples_per_epoch"] == 225.5
    assert result.summary["train_images"] == 14 and result.summary["reg_images"] == 8
    assert rows["reg/1_shape/shape_06.png"]["caption"] == "a shape, a purple square"
    assert rows["train/10_sks circle/circle_05.png"]["caption"] == "a sks circle, purple, flat colour, gradient"
    assert rows["train/5_sks square/square_01.png"]["batch_id"] == "squares"


def test_ratio_and_none_modes(project, tmp_path):
    half = build_plan(paths_of(project, tmp_path), BalanceParams(reg_mode="ratio", reg_ratio=0.5), TrainParams())
    assert half.summary["reg_samples_per_epoch"] == 57  # first total >= 56.25
    own = build_plan(paths_of(project, tmp_path), BalanceParams(reg_mode="none"), TrainParams())
    assert own.summary["reg_samples_per_epoch"] == 8


def test_missing_latent_names_the_image_and_says_run_cache(project, tmp_path):
    import pyarrow.parquet as pq

    keys = read_table(project.paths.keys)
    trimmed = tmp_path / "keys.parquet"
    pq.write_table(pq.read_table(project.paths.keys).slice(1), trimmed)
    paths = BalancePaths(
        project.scan_paths.images, project.bucket_paths.buckets, trimmed, project.paths.store / "manifest.parquet",
        None, None, tmp_path,
    )
    path = next(r["path"] for r in read_table(project.scan_paths.images) if r["image_id"] == keys[0]["image_id"])
    with pytest.raises(KilnError, match=f"{path}: its latent is not in the cache; run `kiln cache`"):
        build_plan(paths, BalanceParams(), TrainParams())


def test_an_image_cache_failed_to_encode_says_what_helps(project, tmp_path):
    import pyarrow.parquet as pq

    # keys.parquet lists the image (cache saw it) but the store holds no latent for it: encoding failed.
    manifest = pq.read_table(project.paths.store / "manifest.parquet")
    failed = manifest.column("cache_key")[0].as_py()
    trimmed = tmp_path / "manifest.parquet"
    pq.write_table(manifest.slice(1), trimmed)
    paths = BalancePaths(
        project.scan_paths.images, project.bucket_paths.buckets, project.paths.keys, trimmed, None, None, tmp_path,
    )
    image_id = next(row["image_id"] for row in read_table(project.paths.keys) if row["cache_key"] == failed)
    path = next(row["path"] for row in read_table(project.scan_paths.images) if row["image_id"] == image_id)
    message = f"{path}: `kiln cache` could not encode this image (it printed why); fix or remove it, then rerun from `kiln scan`"
    with pytest.raises(KilnError) as raised:
        build_plan(paths, BalanceParams(), TrainParams())
    assert str(raised.value) == message


@pytest.mark.parametrize("table", ["keys.parquet", "manifest.parquet"])
def test_a_damaged_cache_table_is_named_with_the_stage_to_rerun(project, tmp_path, table):
    latents = tmp_path / "latents"
    shutil.copytree(project.paths.store, latents, ignore=shutil.ignore_patterns("*.tar"))
    damaged = latents / table
    damaged.write_bytes(damaged.read_bytes()[:100])
    paths = BalancePaths(
        project.scan_paths.images, project.bucket_paths.buckets, latents / "keys.parquet", latents / "manifest.parquet",
        None, None, tmp_path / "plan",
    )
    with pytest.raises(KilnError, match=rf"^{re.escape(str(damaged))}: damaged, not a readable Parquet file \(.*\); rerun `kiln cache`$"):
        build_plan(paths, BalanceParams(), TrainParams())


def test_plan_is_byte_identical_on_rerun(project, tmp_path):
    run(BalanceParams(), TrainParams(), paths_of(project, tmp_path / "a"))
    run(BalanceParams(), TrainParams(), paths_of(project, tmp_path / "b"))
    assert (tmp_path / "a/plan.parquet").read_bytes() == (tmp_path / "b/plan.parquet").read_bytes()


def test_compose_keeps_a_sidecar_caption_as_written():
    written = "Anna,smiling at the camera  , red coat;  (best) [light]"
    assert compose_caption(written, [], "anna", BalanceParams()) == written
    # Tags already in the caption and the class tokens it already holds are not added again.
    assert compose_caption("anna, a red coat", ["a red coat", "snow"], "anna", BalanceParams()) == "anna, a red coat, snow"
    cfg = BalanceParams(caption_template="{class_tokens}, {caption}", caption_prefix="anna")
    assert compose_caption("anna", [], "anna", cfg) == "anna"
    assert compose_caption("", [], "anna", BalanceParams(caption_template="photo of {tags}")) == "photo of"


def test_examples_show_one_caption_per_concept_folder_first(project, tmp_path):
    result = run(BalanceParams(), TrainParams(), paths_of(project, tmp_path))
    assert [path for path, _ in result.examples()] == [
        "reg/1_shape/shape_01.png", "train/10_sks circle/circle_01.png", "train/5_sks square/square_01.png",
    ]
    assert result.examples()[1] == ("train/10_sks circle/circle_01.png", "a sks circle, red, on a blue gradient")


def test_shipped_params_keep_real_sidecar_captions_byte_for_byte(tmp_path):
    """A user's photos with the shipped params.yaml: no model captions or tags, sidecars as written, and
    reg images without a caption train on their class tokens (what kohya does)."""
    import numpy as np
    from PIL import Image

    from pipeline import caption, tag
    from pipeline.bucket import BucketPaths
    from pipeline.bucket import run as run_bucket
    from pipeline.cache import CachePaths
    from pipeline.cache import run as run_cache
    from pipeline.params import load_params
    from pipeline.scan import ScanPaths
    from pipeline.scan import run as run_scan

    params = load_params(Path(__file__).parents[2] / "params.yaml")
    raw = tmp_path / "raw"
    sidecars = {
        "train/10_anna/IMG_0001.jpg": "Anna,smiling at the camera  , red coat",
        "train/10_anna/IMG_0002.jpg": "anna in the snow, (winter:1.2), bokeh",
        "train/10_anna/IMG_0003.jpg": None,
        "reg/1_woman/reg_0001.jpg": None,
        "reg/1_woman/reg_0002.jpg": "a woman, portrait",
    }
    noise = np.random.default_rng(0)
    for rel, text in sidecars.items():
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise.integers(0, 255, (320, 288, 3), dtype=np.uint8)).save(raw / rel, quality=90)
        if text is not None:
            (raw / rel).with_suffix(".txt").write_text(text + "\n")
    scanned = ScanPaths(raw, tmp_path / "scan")
    run_scan(params.scan, scanned)
    caption.run(params.caption, caption.CaptionPaths(scanned.images, raw, tmp_path / "caption"))
    tag.run(params.tag, tag.TagPaths(scanned.files, raw, tmp_path / "tag"))
    buckets = BucketPaths(scanned.files, tmp_path / "bucket")
    run_bucket(params.bucket.model_copy(update={"resolution": (256, 256), "min_bucket_reso": 128}), buckets)
    store = CachePaths(buckets.buckets, scanned.files, raw, tmp_path / "latents")
    run_cache(params.cache, params.model.base, params.bucket.interpolation, store)
    paths = BalancePaths(
        scanned.images, buckets.buckets, store.keys, store.store / "manifest.parquet",
        tmp_path / "caption/captions.parquet", tmp_path / "tag/tags.parquet", tmp_path / "plan",
    )
    result = run(params.balance, params.train, paths)
    assert {row["path"]: row["caption"] for row in result.rows} == {
        "train/10_anna/IMG_0001.jpg": "Anna,smiling at the camera  , red coat",
        "train/10_anna/IMG_0002.jpg": "anna in the snow, (winter:1.2), bokeh",
        "train/10_anna/IMG_0003.jpg": "anna",
        "reg/1_woman/reg_0001.jpg": "woman",
        "reg/1_woman/reg_0002.jpg": "a woman, portrait",
    }
