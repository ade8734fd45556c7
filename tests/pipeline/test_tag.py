import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.params import TagParams
from pipeline.presets import build_tiny_clip, build_tiny_wd14, export_wd14_onnx, write_selected_tags
from pipeline.tables import read_table
from pipeline.tag import ClipTagger, TagPaths, WD14Tagger, format_tags, run, wd14_preprocess


class ChannelProbe(torch.nn.Module):
    """Rigged tagger: score i is a statistic of one input channel, so the input layout is observable."""

    def forward(self, images):  # (N, H, W, 3)
        blue, green, red = images[..., 0], images[..., 1], images[..., 2]
        return torch.stack(
            [blue.mean(dim=(1, 2)) / 255, green.mean(dim=(1, 2)) / 255, red.mean(dim=(1, 2)) / 255, images.amax(dim=(1, 2, 3)) / 255],
            dim=1,
        )


class Constant(torch.nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)

    def forward(self, images):
        return self.scores.expand(images.shape[0], -1) + 0 * images.mean()


@pytest.fixture(scope="module")
def probe_tagger(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    export_wd14_onnx(ChannelProbe(), folder, size=24)
    write_selected_tags(folder, [("blue_mean", 0), ("green_mean", 0), ("red_mean", 0), ("max_value", 0)])
    return folder


CONSTANT_TAGS = [
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("hero_(series)", 4), ("villain", 4),
    ("long_hair", 0), ("smile", 0), ("^_^", 0), ("blurry", 0), ("red_eyes", 0),
]
CONSTANT_SCORES = [0.2, 0.6, 0.1, 0.05, 0.9, 0.7, 0.8, 0.5, 0.4, 0.36, 0.3]


@pytest.fixture(scope="module")
def constant_tagger(tmp_path_factory):
    folder = tmp_path_factory.mktemp("constant")
    export_wd14_onnx(Constant(CONSTANT_SCORES), folder, size=16)
    write_selected_tags(folder, CONSTANT_TAGS)
    return folder


def scores_of(folder, image, **params):
    tagger = WD14Tagger(folder, TagParams(general_threshold=0, character_threshold=0, **params))
    return {name: score for name, _, score in tagger([tagger.preprocess(image)])[0]}


def test_input_size_is_read_from_the_onnx_graph(probe_tagger):
    assert WD14Tagger(probe_tagger, TagParams()).size == 24


def test_preprocess_is_bgr_0_255_nhwc_padded_on_white(probe_tagger):
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    scores = scores_of(probe_tagger, red)
    # RGB red arrives as BGR (0, 0, 255), in 0..255 (not 0..1), as floats.
    assert scores["red_mean"] == pytest.approx(1.0)
    assert scores["blue_mean"] == pytest.approx(0.0)
    assert scores["max_value"] == pytest.approx(1.0)
    # A 2:1 red image is padded to a square on white: half the square is (255, 255, 255).
    wide = Image.new("RGB", (48, 24), (255, 0, 0))
    scores = scores_of(probe_tagger, wide)
    assert scores["blue_mean"] == pytest.approx(0.5, abs=0.03)
    assert scores["green_mean"] == pytest.approx(0.5, abs=0.03)
    assert scores["red_mean"] == pytest.approx(1.0)
    array = wd14_preprocess(wide, 24)
    assert array.shape == (24, 24, 3) and array.dtype == np.float32
    assert array[0, 0].tolist() == [255.0, 255.0, 255.0]  # top row is padding
    assert array[12, 12].tolist() == [0.0, 0.0, 255.0]  # centre is the image, BGR


def test_thresholds_by_category_and_best_rating(constant_tagger):
    tagger = WD14Tagger(constant_tagger, TagParams(general_threshold=0.35, character_threshold=0.85))
    raw = tagger([np.zeros((16, 16, 3), np.float32)])[0]
    assert [(name, category) for name, category, _ in raw] == [
        ("hero_(series)", 4), ("long_hair", 0), ("smile", 0), ("^_^", 0), ("blurry", 0), ("sensitive", 9),
    ]
    tags, scores = format_tags(raw, TagParams())
    assert tags == ["hero (series)", "long hair", "smile", "^_^", "blurry"]
    assert scores == pytest.approx([0.9, 0.8, 0.5, 0.4, 0.36])


def test_formatting_options(constant_tagger):
    tagger = WD14Tagger(constant_tagger, TagParams(general_threshold=0.35, character_threshold=0.6))
    raw = tagger([np.zeros((16, 16, 3), np.float32)])[0]
    tags, _ = format_tags(raw, TagParams(include_ratings=True, character_tags_first=True, underscores_to_spaces=False))
    assert tags == ["sensitive", "hero_(series)", "villain", "long_hair", "smile", "^_^", "blurry"]
    tags, _ = format_tags(raw, TagParams(character_tags_first=False))
    assert tags == ["hero (series)", "long hair", "villain", "smile", "^_^", "blurry"]
    tags, _ = format_tags(raw, TagParams(max_tags=3, blacklist=["long_hair"], replacements={"smile": "smiling"}))
    assert tags == ["hero (series)", "villain", "smiling"]


def test_stage_outputs_cache_and_frequency(scanned_demo, demo_source, tmp_path, constant_tagger):
    paths = TagPaths(scanned_demo.parent / "files.parquet", demo_source, tmp_path / "tag")
    calls = []

    def counting(folder, cfg, vocabulary):
        tagger = WD14Tagger(folder, cfg)
        real = tagger.__call__

        class Counted:
            preprocess = tagger.preprocess

            def __call__(self, batch):
                calls.append(len(batch))
                return real(batch)

        return Counted()

    cfg = TagParams(model=str(constant_tagger), reg_images=True)
    first = run(cfg, paths, counting)
    assert (first.ran, sum(calls)) == (22, 22)
    rows = read_table(paths.tags)
    assert len(rows) == 22
    assert rows[0]["tags"] == ["hero (series)", "long hair", "smile", "^_^", "blurry"]
    assert rows[0]["source"] == f"wd14:{constant_tagger.name}"
    frequency = json.loads(paths.frequency.read_text())
    assert frequency["train/10_sks circle"]["long hair"] == 8
    assert frequency["reg/1_shape"]["smile"] == 8
    tables = paths.tags.read_bytes(), paths.frequency.read_bytes()

    again = run(cfg, paths, counting)
    assert (again.ran, again.from_cache, sum(calls)) == (0, 22, 22)
    assert (paths.tags.read_bytes(), paths.frequency.read_bytes()) == tables
    # Formatting runs after the cache; a threshold is part of the key.
    assert run(cfg.model_copy(update={"max_tags": 2}), paths, counting).ran == 0
    assert run(cfg.model_copy(update={"general_threshold": 0.5}), paths, counting).ran == 22


def test_tiny_wd14_preset_folder_runs(scanned_demo, demo_source, tmp_path):
    folder = tmp_path / "wd14"
    folder.mkdir()
    build_tiny_wd14(folder)
    result = run(TagParams(model=str(folder), general_threshold=0.0), TagPaths(scanned_demo.parent / "files.parquet", demo_source, tmp_path / "t"))
    # Reg images are tagged only when tag.reg_images asks: 14 train images of 22.
    assert result.ran == 14 and all(row["tags"] for row in result.rows)
    assert {row["image_id"] for row in result.rows} == {
        row["image_id"] for row in read_table(scanned_demo.parent / "files.parquet") if not row["subset"].startswith("reg/")
    }


def test_without_a_model_no_tags_are_written(scanned_demo, demo_source, tmp_path):
    paths = TagPaths(scanned_demo.parent / "files.parquet", demo_source, tmp_path / "t")
    result = run(TagParams(), paths, lambda *args: pytest.fail("no tagger may be built"))
    assert result.model is None and read_table(paths.tags) == [] and read_table(paths.cache) == []
    assert json.loads(paths.frequency.read_text()) == {}


def test_clip_zero_shot_matches_an_independent_cosine(tmp_path, scanned_demo, demo_source):
    from transformers import CLIPModel, CLIPProcessor

    folder = tmp_path / "clip"
    folder.mkdir()
    build_tiny_clip(folder)
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("# shapes\ncircle\nsquare\ntriangle\nred\ncircle\n")
    cfg = TagParams(backend="clip", model=str(folder), vocabulary=str(vocabulary), clip_threshold=-1.0, top_k=2)
    result = run(cfg, TagPaths(scanned_demo.parent / "files.parquet", demo_source, tmp_path / "t"))
    assert all(len(row["tags"]) == 2 for row in result.rows)
    assert all(row["scores"][0] >= row["scores"][1] for row in result.rows)

    image = Image.new("RGB", (50, 40), (200, 30, 30))
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        out = model(**processor(text=["circle", "square", "triangle", "red"], images=[image], return_tensors="pt", padding=True))
    expected = (out.image_embeds @ out.text_embeds.T)[0].numpy()
    tagger = ClipTagger(folder, cfg, ["circle", "square", "triangle", "red"])
    got = {name: score for name, _, score in tagger([image])[0]}
    assert [got[w] for w in ["circle", "square", "triangle", "red"]] == pytest.approx(expected.tolist(), abs=1e-5)


def test_clip_needs_a_vocabulary():
    from pipeline.errors import ParamsError

    with pytest.raises(ParamsError, match="tag.vocabulary: the clip backend needs a vocabulary file"):
        TagParams(backend="clip", model="tiny-clip")
    assert TagParams(backend="clip").model is None  # tagging off: no vocabulary needed
