import shutil

import pytest

from pipeline.caption import Captioner, CaptionPaths, combine, normalise, run
from pipeline.params import CaptionParams, Replacement
from pipeline.presets import build_tiny_blip
from pipeline.tables import read_table


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A tiny BLIP saved to a folder the way real weights are, tokenizer files included."""
    folder = tmp_path_factory.mktemp("tiny-blip")
    build_tiny_blip(folder)
    return folder


class StubCaptioner:
    """Counts model calls; the caption names the image size so tests can check which image got which."""

    calls: list[int] = []

    def __init__(self, folder, cfg):
        self.cfg = cfg

    def __call__(self, images):
        StubCaptioner.calls.append(len(images))
        return [f"generated {image.width}x{image.height}" for image in images]


@pytest.fixture
def paths(scanned_demo, demo_source, tmp_path):
    StubCaptioner.calls = []
    return CaptionPaths(scanned_demo, demo_source, tmp_path / "caption")


def by_id(result):
    return {row["image_id"]: row for row in result.rows}


@pytest.mark.parametrize("reg_images", [False, True])
def test_missing_mode_keeps_user_captions_and_captions_the_rest(paths, tiny_blip, reg_images):
    result = run(CaptionParams(model=str(tiny_blip), mode="missing", reg_images=reg_images), paths, StubCaptioner)
    images = {row["image_id"]: row for row in read_table(paths.images)}
    for image_id, row in by_id(result).items():
        image = images[image_id]
        if image["caption_source"] in ("sidecar", "yaml") or (image["is_reg"] and not reg_images):
            # A reg image without a caption keeps its class tokens, as kohya trains it.
            assert (row["caption"], row["source"]) == (image["caption"], image["caption_source"])
        else:
            assert row["caption"] == f"generated {image['width']}x{image['height']}"
            assert row["source"] == f"model:{tiny_blip.name}"
    reg_uncaptioned = sum(image["is_reg"] and image["caption_source"] == "class_tokens" for image in images.values())
    assert reg_uncaptioned == 7
    expected = 11 if reg_images else 11 - reg_uncaptioned
    assert result.model_captioned == expected and sum(StubCaptioner.calls) == expected


def test_without_a_model_every_caption_passes_through_byte_for_byte(paths):
    result = run(CaptionParams(), paths, StubCaptioner)
    images = sorted(read_table(paths.images), key=lambda row: row["image_id"])
    assert [(row["image_id"], row["caption"], row["source"]) for row in result.rows] == [
        (image["image_id"], image["caption"], image["caption_source"]) for image in images
    ]
    assert StubCaptioner.calls == [] and result.model_captioned == 0
    assert read_table(paths.cache) == []  # the declared output exists, empty
    assert result.sources()["class_tokens"] == (11, "shape")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("overwrite", "generated 512x512"),
        ("append", "a sks circle, red, on a blue gradient, generated 512x512"),
        ("prepend", "generated 512x512, a sks circle, red, on a blue gradient"),
    ],
)
def test_overwrite_append_prepend(paths, tiny_blip, mode, expected):
    result = run(CaptionParams(model=str(tiny_blip), mode=mode, reg_images=True), paths, StubCaptioner)
    images = {row["path"]: row["image_id"] for row in read_table(paths.images)}
    row = by_id(result)[images["train/10_sks circle/circle_01.png"]]
    assert row["caption"] == expected
    assert row["source"] == f"model:{tiny_blip.name}"
    assert result.model_captioned == 22


def test_combine_without_existing_caption_is_the_generated_one():
    assert combine("", "gen", "append", ", ") == "gen"
    assert combine("old", "gen", "overwrite", ", ") == "gen"


def test_normalisation():
    cfg = CaptionParams(
        lowercase=True,
        replacements=[Replacement(pattern=r"^arafed ", replace=""), Replacement(pattern=r"\bpic\b", replace="picture")],
    )
    assert normalise("  Arafed   Cat on a  pic ,  a cat, Cat on a pic  ", cfg) == "cat on a picture, a cat"
    assert normalise("a, a, b", CaptionParams(dedupe_phrases=False)) == "a, a, b"


def test_cached_images_are_not_run_again(paths, tiny_blip, demo_source, tmp_path):
    cfg = CaptionParams(model=str(tiny_blip), mode="overwrite", batch_size=4, reg_images=True)
    first = run(cfg, paths, StubCaptioner)
    assert (first.ran, first.from_cache, sum(StubCaptioner.calls)) == (22, 0, 22)
    captions = paths.captions.read_bytes()
    again = run(cfg, paths, StubCaptioner)
    assert (again.ran, again.from_cache, sum(StubCaptioner.calls)) == (0, 22, 22)
    assert paths.captions.read_bytes() == captions
    # Normalisation and policy are applied after the cache: changing them runs no model.
    lower = run(cfg.model_copy(update={"lowercase": True, "mode": "append"}), paths, StubCaptioner)
    assert lower.ran == 0
    # A new generation param is a new cache key.
    beams = run(cfg.model_copy(update={"num_beams": 2}), paths, StubCaptioner)
    assert (beams.ran, sum(StubCaptioner.calls)) == (22, 44)


def test_a_damaged_model_cache_is_computed_again_with_a_warning(paths, tiny_blip, caplog):
    cfg = CaptionParams(model=str(tiny_blip), mode="overwrite", batch_size=4, reg_images=True)
    run(cfg, paths, StubCaptioner)
    captions = paths.captions.read_bytes()
    paths.cache.write_bytes(paths.cache.read_bytes()[:100])  # a kill mid-write elsewhere, a bad disk
    again = run(cfg, paths, StubCaptioner)
    assert (again.ran, again.from_cache) == (22, 0) and paths.captions.read_bytes() == captions
    assert f"{paths.cache}: damaged, not a readable Parquet file" in caplog.text
    assert "its model outputs will be computed again" in caplog.text


def test_adding_images_captions_only_the_new_ones(demo_source, tmp_path, tiny_blip):
    from pipeline.params import ScanParams
    from pipeline.scan import ScanPaths
    from pipeline.scan import run as scan

    root = tmp_path / "raw"
    shutil.copytree(demo_source, root)
    scan_paths = ScanPaths(root, tmp_path / "scan")
    scan(ScanParams(workers=1), scan_paths)
    paths = CaptionPaths(scan_paths.images, root, tmp_path / "caption")
    StubCaptioner.calls = []
    cfg = CaptionParams(model=str(tiny_blip), mode="overwrite", reg_images=True)
    run(cfg, paths, StubCaptioner)
    shutil.copy(root / "reg/1_shape/shape_01.png", root / "reg/1_shape/shape_09.png")
    from PIL import Image

    Image.new("RGB", (333, 444), (9, 9, 9)).save(root / "reg/1_shape/shape_10.png")
    scan(ScanParams(workers=1), scan_paths)  # shape_09 is a duplicate: only shape_10 is new
    StubCaptioner.calls = []
    result = run(cfg, paths, StubCaptioner)
    assert (result.ran, result.from_cache, StubCaptioner.calls) == (1, 22, [1])


def test_a_failing_image_is_reported_and_the_rest_captioned(paths, tiny_blip):
    class Flaky(StubCaptioner):
        def __call__(self, images):
            if any(image.size == (1600, 400) for image in images):
                raise RuntimeError("CUDA error: device-side assert")
            return super().__call__(images)

    result = run(CaptionParams(model=str(tiny_blip), mode="overwrite", batch_size=8, reg_images=True), paths, Flaky)
    assert len(result.failures) == 2
    assert sorted(f.split(":")[0] for f in result.failures) == ["reg/1_shape/shape_04.png", "train/10_sks circle/circle_04.png"]
    assert result.ran == 20
    assert len(read_table(paths.cache)) == 20  # failures are not cached: the next run retries them


def test_real_tiny_blip_through_the_folder_path(paths, tiny_blip):
    cfg = CaptionParams(model=str(tiny_blip), mode="overwrite", max_new_tokens=6, batch_size=8, prompt="a photo of", reg_images=True)
    result = run(cfg, paths)
    assert result.ran == 22
    for row in result.rows:
        assert row["caption"].startswith("a photo of")  # BLIP's conditional captioning continues the prompt
        assert row["source"] == f"model:{tiny_blip.name}"
    first = paths.captions.read_bytes()
    run(cfg, paths)
    assert paths.captions.read_bytes() == first


def test_batched_and_single_generation_agree(tiny_blip, demo_source):
    from pipeline.inference import load_rgb

    captioner = Captioner(tiny_blip, CaptionParams(max_new_tokens=5))
    images = [load_rgb(path) for path in sorted((demo_source / "reg/1_shape").glob("*.png"))[:3]]
    assert captioner(images) == [captioner([image])[0] for image in images]
