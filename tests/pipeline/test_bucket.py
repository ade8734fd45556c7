import logging

import pytest

from pipeline.bucket import BucketPaths, Geometry, assign, bucket_images, make_buckets, run
from pipeline.errors import KilnError
from pipeline.params import BucketParams, ScanParams
from pipeline.scan import ScanPaths
from pipeline.scan import run as run_scan
from pipeline.tables import read_table

# Worked by hand from the rule: square side floor(sqrt(area)) to the step; for each width w from min to
# max, h = min(max, floor(area / w / step) * step), keeping (w, h) and (h, w) when h >= min.
SD15_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]
RES_768x512 = [
    (256, 1024), (320, 1024), (384, 896), (384, 960), (384, 1024), (448, 832), (512, 704), (512, 768),
    (576, 576), (576, 640),
    (640, 576), (704, 512), (768, 512), (832, 448), (896, 384), (960, 384), (1024, 256), (1024, 320),
    (1024, 384),
]
SDXL_1024_STEP32 = [
    (768, 1280), (800, 1280), (832, 1216), (832, 1248), (864, 1184), (896, 1152), (928, 1120), (960, 1088),
    (992, 1056), (1024, 1024), (1056, 992), (1088, 960), (1120, 928), (1152, 896), (1184, 864), (1216, 832),
    (1248, 832), (1280, 768), (1280, 800),
]


@pytest.mark.parametrize(
    ("resolution", "min_reso", "max_reso", "step", "expected"),
    [
        ((512, 512), 256, 1024, 64, SD15_512),
        ((768, 512), 256, 1024, 64, RES_768x512),
        ((1024, 1024), 768, 1280, 32, SDXL_1024_STEP32),
    ],
)
def test_exact_bucket_lists(resolution, min_reso, max_reso, step, expected):
    assert make_buckets(resolution, min_reso, max_reso, step) == expected


def test_nearest_aspect_cover_and_centre_crop():
    cfg = BucketParams()
    buckets = make_buckets((512, 512), 256, 1024, 64)
    # 3:2 lies nearer 640x384 (1.667) than 576x448 (1.286); cover scale 640/1200 gives 640x427.
    assert assign(1200, 800, "id", buckets, cfg) == Geometry(640, 384, 640, 427, 0, 21, pytest.approx(1 / 9))
    assert assign(512, 512, "id", buckets, cfg) == Geometry(512, 512, 512, 512, 0, 0, 0.0)
    assert assign(400, 1600, "id", buckets, cfg) == Geometry(256, 1024, 256, 1024, 0, 0, 0.0)
    # 1:3 lies nearer 256x832 (0.308) than 320x768 (0.417); upscaled by 832/900 to cover the height.
    assert assign(300, 900, "id", buckets, cfg) == Geometry(256, 832, 277, 832, 10, 0, pytest.approx(0.0769, abs=1e-4))


def test_no_upscale_only_scales_down_and_floors_to_step():
    cfg = BucketParams(bucket_no_upscale=True)
    # 2000x1000 scaled to area 512^2: 724x362, floored to 704x320, then covered at 704/2000.
    assert assign(2000, 1000, "id", [], cfg) == Geometry(704, 320, 704, 352, 0, 16, pytest.approx(0.1))
    # Smaller than the area: never upscaled; 300x200 floors to 256x192 and is covered at 0.96.
    small = assign(300, 200, "id", [], cfg)
    assert (small.bucket_w, small.bucket_h, small.resize_w, small.resize_h) == (256, 192, 288, 192)
    assert small.resize_w <= 300 and small.resize_h <= 200


def test_random_crop_is_deterministic_per_seed_and_image():
    cfg = BucketParams(random_crop=True, seed=7)
    buckets = make_buckets((512, 512), 256, 1024, 64)
    # 2000x1000 goes to 704x320 resized to 704x352: 32 rows of crop freedom.
    first = assign(2000, 1000, "image-a", buckets, cfg)
    assert assign(2000, 1000, "image-a", buckets, cfg) == first
    offsets = [assign(2000, 1000, f"image-{i}", buckets, cfg).crop_top for i in range(20)]
    assert len(set(offsets)) > 5  # really random across images
    other_seed = [assign(2000, 1000, f"image-{i}", buckets, BucketParams(random_crop=True, seed=8)).crop_top for i in range(20)]
    assert offsets != other_seed
    for i in range(20):
        geometry = assign(2000, 1000, f"image-{i}", buckets, cfg)
        assert 0 <= geometry.crop_left <= geometry.resize_w - geometry.bucket_w
        assert 0 <= geometry.crop_top <= geometry.resize_h - geometry.bucket_h


def test_an_image_crop_does_not_depend_on_the_other_images():
    cfg = BucketParams(random_crop=True)
    images = [{"image_id": f"{i:02d}", "path": f"p{i}", "width": 1500 + i, "height": 900} for i in range(10)]
    alone = bucket_images(images[3:4], cfg).rows[0]
    together = next(row for row in bucket_images(images, cfg).rows if row["image_id"] == "03")
    assert alone == together


def test_aspect_error_warning_names_the_image(demo_root, tmp_path, caplog):
    scan_paths = ScanPaths(demo_root, tmp_path / "scan")
    run_scan(ScanParams(workers=1), scan_paths)
    with caplog.at_level(logging.WARNING):
        result = run(BucketParams(max_aspect_error=0.05), BucketPaths(scan_paths.files, tmp_path / "bucket"))
    assert result.over_error
    assert "reg/1_shape/shape_02.png: 768x512 in bucket 640x384 (aspect error 11% > bucket.max_aspect_error=5%)" in caplog.text


def test_outputs_are_byte_identical_and_ignore_captions(demo_root, tmp_path):
    scan_paths = ScanPaths(demo_root, tmp_path / "scan")
    run_scan(ScanParams(workers=1), scan_paths)
    first = BucketPaths(scan_paths.files, tmp_path / "bucket1")
    result = run(BucketParams(), first)
    buckets_bytes, counts_bytes = first.buckets.read_bytes(), first.counts.read_bytes()

    (demo_root / "train/10_sks circle/circle_01.txt").write_text("a completely different caption\n")
    images_before = scan_paths.images.read_bytes()
    run_scan(ScanParams(workers=1), scan_paths)
    assert scan_paths.images.read_bytes() != images_before
    second = BucketPaths(scan_paths.files, tmp_path / "bucket2")
    run(BucketParams(), second)
    assert second.buckets.read_bytes() == buckets_bytes
    assert second.counts.read_bytes() == counts_bytes

    rows = read_table(first.buckets)
    assert [row["image_id"] for row in rows] == sorted(row["image_id"] for row in rows)
    assert set(rows[0]) == {
        "image_id", "bucket", "bucket_w", "bucket_h", "resize_w", "resize_h", "crop_left", "crop_top", "aspect_error",
    }
    assert sum(entry["count"] for entry in result.counts) == 22
    assert {entry["bucket"] for entry in result.counts} == {"256x1024", "384x640", "512x512", "576x448", "640x384", "1024x256"}


def test_missing_images_table_says_run_scan(tmp_path):
    with pytest.raises(KilnError, match="run `kiln scan` first"):
        run(BucketParams(), BucketPaths(tmp_path / "files.parquet", tmp_path / "out"))
