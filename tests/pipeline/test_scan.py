import hashlib
import logging
from pathlib import Path

import pytest
from PIL import Image

from pipeline.errors import KilnError
from pipeline.params import ScanParams
from pipeline.scan import EmptyDataset, ScanPaths, parse_concept_folder, probe_image, run, scan
from pipeline.tables import read_table
from tests.conftest import image_bytes, write_image

CFG = ScanParams(min_side=64, workers=1)


def scan_rows(root: Path, cfg: ScanParams = CFG):
    result, _ = scan(root, cfg)
    return {row["path"]: row for row in result.images}, {row["path"]: row for row in result.rejected}, result


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("10_sks circle", (10, "sks circle")),
        ("1_shape", (1, "shape")),
        ("3_a_b c", (3, "a_b c")),
        ("0_zero", (0, "zero")),
        ("cats", None),
        ("x10_cats", None),
        ("10cats", None),
    ],
)
def test_parse_concept_folder(name, expected):
    assert parse_concept_folder(name) == expected


def test_folders_repeats_class_tokens_and_reg(tmp_path):
    write_image(tmp_path / "train/10_sks dog/a.png")
    write_image(tmp_path / "reg/1_dog/b.png", colour=10)
    images, rejected, _ = scan_rows(tmp_path)
    assert images["train/10_sks dog/a.png"]["repeats"] == 10
    assert images["train/10_sks dog/a.png"]["class_tokens"] == "sks dog"
    assert images["train/10_sks dog/a.png"]["is_reg"] is False
    assert images["train/10_sks dog/a.png"]["subset"] == "train/10_sks dog"
    assert images["reg/1_dog/b.png"]["is_reg"] is True
    assert not rejected


def test_folder_without_prefix_is_skipped_with_a_warning(tmp_path, caplog):
    write_image(tmp_path / "train/cats/a.png")
    with caplog.at_level(logging.WARNING):
        images, rejected, result = scan_rows(tmp_path)
    assert images == {}
    assert rejected["train/cats/a.png"]["reason"] == "folder_skipped"
    assert "rename it to '1_cats'" in rejected["train/cats/a.png"]["detail"]
    assert any("train/cats: skipped (1 images)" in message for message in result.warnings)
    assert "train/cats: skipped" in caplog.text


def test_folder_without_prefix_taken_with_repeats_one_when_allowed(tmp_path):
    write_image(tmp_path / "train/cats/a.png")
    images, _, _ = scan_rows(tmp_path, CFG.model_copy(update={"require_repeats_prefix": False}))
    assert images["train/cats/a.png"]["repeats"] == 1
    assert images["train/cats/a.png"]["class_tokens"] == "cats"


def test_zero_repeats_folder_is_skipped(tmp_path):
    write_image(tmp_path / "train/0_cats/a.png")
    _, rejected, _ = scan_rows(tmp_path)
    assert rejected["train/0_cats/a.png"]["detail"] == "folder repeats must be at least 1"


def test_recursive_scanning_is_an_option(tmp_path):
    write_image(tmp_path / "train/2_x/top.png")
    write_image(tmp_path / "train/2_x/sub/deep.png", colour=3)
    images, _, _ = scan_rows(tmp_path)
    assert list(images) == ["train/2_x/top.png"]
    images, _, _ = scan_rows(tmp_path, CFG.model_copy(update={"recursive": True}))
    assert list(images) == ["train/2_x/sub/deep.png", "train/2_x/top.png"]
    assert images["train/2_x/sub/deep.png"]["repeats"] == 2


def test_missing_train_and_reg_is_a_clear_error(tmp_path):
    with pytest.raises(KilnError, match="no train/ or reg/ folder"):
        scan(tmp_path, CFG)


def test_sidecar_caption_first_line_bom_stripped_and_extension_order(tmp_path):
    folder = tmp_path / "train/1_x"
    write_image(folder / "a.png")
    (folder / "a.txt").write_bytes("\ufeffa photo of sks\nsecond line ignored\n".encode())
    write_image(folder / "b.png", colour=1)
    (folder / "b.caption").write_text("from caption file\n")
    write_image(folder / "c.png", colour=2)
    (folder / "c.caption").write_text("caption ext\n")
    (folder / "c.txt").write_text("txt ext\n")
    images, _, _ = scan_rows(tmp_path)
    assert images["train/1_x/a.png"]["caption"] == "a photo of sks"
    assert images["train/1_x/a.png"]["caption_source"] == "sidecar"
    assert images["train/1_x/b.png"]["caption"] == "from caption file"
    assert images["train/1_x/c.png"]["caption"] == "txt ext"
    reversed_cfg = CFG.model_copy(update={"caption_extensions": [".caption", ".txt"]})
    images, _, _ = scan_rows(tmp_path, reversed_cfg)
    assert images["train/1_x/c.png"]["caption"] == "caption ext"


def test_non_utf8_caption_is_read_with_a_warning(tmp_path):
    folder = tmp_path / "train/1_x"
    write_image(folder / "a.png")
    (folder / "a.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))
    images, _, result = scan_rows(tmp_path)
    assert images["train/1_x/a.png"]["caption"] == "café au lait"
    assert result.warnings == ["train/1_x/a.txt: not UTF-8, read as cp1252; save it as UTF-8"]


def test_caption_fallback_order(tmp_path):
    folder = tmp_path / "train/1_sks thing"
    write_image(folder / "red ball_001.png", colour=1)
    write_image(folder / "blue cube_002.png", colour=2)
    (folder / "blue cube_002.yaml").write_text("main_prompt: from yaml\n")
    (folder / "blue cube_002.txt").write_text("from sidecar\n")
    write_image(folder / "green_003.png", colour=3)
    (folder / "green_003.yaml").write_text("main_prompt: only yaml\n")
    images, _, _ = scan_rows(tmp_path)
    assert images["train/1_sks thing/blue cube_002.png"]["caption_source"] == "sidecar"
    assert images["train/1_sks thing/green_003.png"]["caption"] == "only yaml"
    assert images["train/1_sks thing/green_003.png"]["caption_source"] == "yaml"
    assert images["train/1_sks thing/red ball_001.png"]["caption"] == "sks thing"
    assert images["train/1_sks thing/red ball_001.png"]["caption_source"] == "class_tokens"
    images, _, _ = scan_rows(tmp_path, CFG.model_copy(update={"caption_from_filename": True}))
    assert images["train/1_sks thing/red ball_001.png"]["caption"] == "red ball"
    assert images["train/1_sks thing/red ball_001.png"]["caption_source"] == "filename"


def test_yaml_merge_order_global_then_folder_files_then_local_then_sidecar(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "global.yaml").write_text("flip_p: 0.1\ncond_dropout: 0.2\nloss_scale: 2.0\nbatch_id: root\nmultiply: 3\n")
    (tmp_path / "train/global.yaml").write_text("cond_dropout: 0.3\n")
    folder = tmp_path / "train/1_x"
    write_image(folder / "a.png")
    write_image(folder / "b.png", colour=1)
    (folder / "multiply.txt").write_text("2.5\n")
    (folder / "batch_id.txt").write_text("folder-batch\n")
    (folder / "local.yaml").write_text("loss_scale: 0.5\nbatch_id: local-batch\nshuffle_tags: true\n")
    (folder / "a.yaml").write_text(
        "main_prompt: a thing\nloss_scale: 0.25\ntags:\n  - tag: red\n    weight: 1.5\n  - plain\n"
    )
    other = tmp_path / "reg/1_y"
    write_image(other / "c.png", colour=2)
    images, _, _ = scan_rows(tmp_path)
    a, b, c = images["train/1_x/a.png"], images["train/1_x/b.png"], images["reg/1_y/c.png"]
    assert (a["flip_p"], a["cond_dropout"], a["multiply"]) == (0.1, 0.3, 2.5)
    assert (a["loss_scale"], a["batch_id"], a["shuffle_tags"]) == (0.25, "local-batch", True)
    assert (a["yaml_tags"], a["yaml_tag_weights"]) == (["red", "plain"], [1.5, 1.0])
    assert (b["loss_scale"], b["batch_id"], b["caption_source"]) == (0.5, "local-batch", "class_tokens")
    # Only the root global.yaml reaches reg/: train/global.yaml and train's local files do not.
    assert (c["cond_dropout"], c["multiply"], c["batch_id"], c["shuffle_tags"]) == (0.2, 3.0, "root", None)


def test_defaults_when_no_metadata(tmp_path):
    write_image(tmp_path / "train/1_x/a.png")
    row = scan_rows(tmp_path)[0]["train/1_x/a.png"]
    assert (row["multiply"], row["loss_scale"], row["flip_p"], row["cond_dropout"], row["batch_id"]) == (1.0, 1.0, None, None, None)


@pytest.mark.parametrize(
    ("yaml_text", "detail"),
    [
        ("flip_p: 2\n", "train/1_x/a.yaml: flip_p must be between 0 and 1 (got 2.0)"),
        ("multiply: lots\n", "train/1_x/a.yaml: multiply must be a number (got 'lots')"),
        ("main_prompt: [unclosed\n", "train/1_x/a.yaml: not valid YAML"),
        ("- a list\n", "train/1_x/a.yaml: expected a mapping of keys, got list"),
    ],
)
def test_bad_yaml_rejects_the_image_naming_the_file(tmp_path, yaml_text, detail):
    write_image(tmp_path / "train/1_x/a.png")
    (tmp_path / "train/1_x/a.yaml").write_text(yaml_text)
    write_image(tmp_path / "train/1_x/b.png", colour=1)
    images, rejected, _ = scan_rows(tmp_path)
    assert rejected["train/1_x/a.png"]["reason"] == "bad_metadata"
    assert rejected["train/1_x/a.png"]["detail"].startswith(detail)
    assert "train/1_x/b.png" in images


def test_each_rejection_reason(tmp_path):
    folder = tmp_path / "train/1_x"
    folder.mkdir(parents=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_bytes(b"this is not an image at all")
    good = image_bytes((320, 320), colour=(10, 200, 30), fmt="JPEG")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    write_image(folder / "small.png", size=(40, 300), colour=4)
    write_image(folder / "huge.png", size=(400, 400), colour=5)
    write_image(folder / "a_original.png", colour=6)
    (folder / "b_copy.png").write_bytes((folder / "a_original.png").read_bytes())
    outside = write_image(tmp_path.parent / f"{tmp_path.name}-outside.png", colour=7)
    (folder / "escape.png").symlink_to(outside)
    write_image(tmp_path / "train/inside.png", colour=8)
    (folder / "inside_link.png").symlink_to(tmp_path / "train/inside.png")
    cfg = CFG.model_copy(update={"max_pixels": 150_000})
    images, rejected, result = scan_rows(tmp_path, cfg)
    reasons = {path.split("/")[-1]: row["reason"] for path, row in rejected.items()}
    assert reasons == {
        "empty.png": "empty",
        "text.png": "not_image",
        "truncated.jpg": "corrupt",
        "small.png": "too_small",
        "huge.png": "too_large",
        "b_copy.png": "duplicate",
        "escape.png": "symlink_outside_root",
        "inside.png": "no_concept_folder",
    }
    assert rejected["train/1_x/b_copy.png"]["detail"] == "same bytes as train/1_x/a_original.png"
    assert rejected["train/1_x/small.png"]["detail"] == "40x300: shorter side below scan.min_side=64"
    assert rejected["train/1_x/huge.png"]["detail"] == "400x400 is over scan.max_pixels=150000"
    assert "truncated" in rejected["train/1_x/truncated.jpg"]["detail"]
    assert sorted(images) == ["train/1_x/a_original.png", "train/1_x/inside_link.png"]
    assert result.summary["rejected_by_reason"] == {
        "corrupt": 1, "duplicate": 1, "empty": 1, "no_concept_folder": 1, "not_image": 1,
        "symlink_outside_root": 1, "too_large": 1, "too_small": 1,
    }


def test_decompression_bomb_rejected_before_decoding(tmp_path):
    path = write_image(tmp_path / "bomb.png", size=(2000, 2000), mode="L", colour=0)
    probe = probe_image(str(path), max_pixels=1000)
    assert probe["reason"] == "too_large"


def _save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def test_unusual_modes_are_accepted_and_noted(tmp_path):
    folder = tmp_path / "train/1_x"
    _save(folder / "cmyk.jpg", Image.new("CMYK", (200, 100), (0, 50, 100, 0)))
    palette = Image.new("P", (100, 100), 1)
    palette.info["transparency"] = 1
    _save(folder / "palette.png", palette, transparency=1)
    _save(folder / "la.png", Image.new("LA", (100, 100), (100, 128)))
    _save(folder / "sixteen.png", Image.new("I;16", (100, 100), 4000))
    frames = [Image.new("RGB", (120, 90), (i * 80, 0, 0)) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    rotated = Image.new("RGB", (300, 100), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(folder / "rotated.jpg", rotated, exif=exif.tobytes())
    images, rejected, result = scan_rows(tmp_path)
    assert not rejected
    notes = {path.split("/")[-1]: row["notes"] for path, row in images.items()}
    assert notes == {
        "anim.gif": ["animated"],
        "cmyk.jpg": ["cmyk"],
        "la.png": ["la"],
        "palette.png": ["palette_transparency"],
        "rotated.jpg": ["exif_rotated"],
        "sixteen.png": ["16bit"],
    }
    assert images["train/1_x/la.png"]["has_alpha"] and images["train/1_x/palette.png"]["has_alpha"]
    assert not images["train/1_x/cmyk.jpg"]["has_alpha"]
    # EXIF orientation 6 is a quarter turn: the image trains as 100x300.
    assert (images["train/1_x/rotated.jpg"]["width"], images["train/1_x/rotated.jpg"]["height"]) == (100, 300)
    assert (images["train/1_x/anim.gif"]["width"], images["train/1_x/anim.gif"]["height"]) == (120, 90)
    assert result.summary["notes"]["animated"] == 1


def test_masks_beside_image_or_in_masks_dir(tmp_path):
    folder = tmp_path / "train/1_x"
    write_image(folder / "a.png")
    write_image(folder / "a-masklabel.png", mode="L", colour=255)
    write_image(folder / "b.png", colour=1)
    write_image(tmp_path / "masks/train/1_x/b.png", mode="L", colour=255)
    images, _, _ = scan_rows(tmp_path)
    assert images["train/1_x/a.png"]["mask_path"] == "train/1_x/a-masklabel.png"
    assert "train/1_x/a-masklabel.png" not in images  # a mask is not a training image
    assert images["train/1_x/b.png"]["mask_path"] is None
    images, _, _ = scan_rows(tmp_path, CFG.model_copy(update={"masks_dir": "masks"}))
    assert images["train/1_x/b.png"]["mask_path"] == "masks/train/1_x/b.png"


SIDECARS = ["train/1_x/a.txt", "train/1_x/a.yaml", "train/1_x/local.yaml", "global.yaml", "train/1_x/a-masklabel.png"]


@pytest.mark.parametrize("sidecar", SIDECARS)
def test_sidecar_symlinked_outside_the_root_is_not_read(tmp_path, sidecar):
    root = tmp_path / "raw"
    write_image(root / "train/1_x/a.png")
    # a.jpg shares a.png's sidecars: the refused file is still recorded once.
    write_image(root / "train/1_x/a.jpg", colour=1, fmt="JPEG")
    outside = tmp_path / "outside.yaml"
    outside.write_text("main_prompt: stolen\nmultiply: 7\n")
    (root / sidecar).symlink_to(outside)
    images, rejected, result = scan_rows(root)
    for name in ("a.png", "a.jpg"):
        image = images[f"train/1_x/{name}"]
        assert (image["caption"], image["caption_source"], image["multiply"], image["mask_path"]) == ("x", "class_tokens", 1.0, None)
    target = outside.resolve()
    assert rejected == {sidecar: {"path": sidecar, "reason": "symlink_outside_root", "detail": f"points to {target}"}}
    assert result.warnings == [f"{sidecar}: a symlink to {target}, outside the data root; not read"]


@pytest.mark.parametrize(
    ("sidecar", "text", "caption", "multiply"),
    [
        ("train/1_x/a.txt", "a shared caption\n", "a shared caption", 1.0),
        ("train/1_x/a.yaml", "main_prompt: shared\nmultiply: 7\n", "shared", 7.0),
        ("train/1_x/local.yaml", "main_prompt: shared\nmultiply: 7\n", "shared", 7.0),
        ("global.yaml", "main_prompt: shared\nmultiply: 7\n", "shared", 7.0),
    ],
)
def test_sidecar_symlinked_inside_the_root_is_read(tmp_path, sidecar, text, caption, multiply):
    write_image(tmp_path / "train/1_x/a.png")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared/meta").write_text(text)
    (tmp_path / sidecar).symlink_to(tmp_path / "shared/meta")
    images, rejected, result = scan_rows(tmp_path)
    image = images["train/1_x/a.png"]
    assert (image["caption"], image["multiply"]) == (caption, multiply)
    assert rejected == {} and result.warnings == []


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(path.relative_to(root)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_run_writes_outputs_byte_identical_and_never_touches_user_files(demo_root, tmp_path):
    before = tree_digest(demo_root)
    first = ScanPaths(demo_root, tmp_path / "out1")
    second = ScanPaths(demo_root, tmp_path / "out2")
    result = run(ScanParams(), first)
    run(ScanParams(), second)
    assert tree_digest(demo_root) == before
    for name in ("images.parquet", "rejected.parquet", "summary.json"):
        assert (first.out_dir / name).read_bytes() == (second.out_dir / name).read_bytes(), name
    rows = read_table(first.images)
    assert len(rows) == result.summary["images"] == 22
    assert rows == sorted(rows, key=lambda row: row["path"])
    assert result.summary["train_images"] == 14 and result.summary["reg_images"] == 8
    assert result.summary["masks"] == 1
    assert {row["path"] for row in rows if row["has_alpha"]} == {"train/10_sks circle/circle_08.png"}


def test_rescan_reuses_unchanged_files_and_reprobes_changed_ones(demo_root, tmp_path):
    paths = ScanPaths(demo_root, tmp_path / "out")
    first = run(ScanParams(workers=1), paths)
    assert (first.probed, first.reused) == (22, 0)
    images_bytes = paths.images.read_bytes()
    again = run(ScanParams(workers=1), paths)
    assert (again.probed, again.reused) == (0, 22)
    assert paths.images.read_bytes() == images_bytes
    target = demo_root / "reg/1_shape/shape_08.png"
    Image.new("RGB", (400, 400), (1, 2, 3)).save(target)
    changed = run(ScanParams(workers=1), paths)
    assert (changed.probed, changed.reused) == (1, 21)
    row = next(r for r in read_table(paths.images) if r["path"] == "reg/1_shape/shape_08.png")
    assert row["image_id"] == hashlib.sha256(target.read_bytes()).hexdigest()


def test_pool_and_single_process_agree(demo_root, tmp_path):
    single, _ = scan(demo_root, ScanParams(workers=1))
    pooled, _ = scan(demo_root, ScanParams(workers=2))
    assert pooled.images == single.images


def test_damaged_probe_cache_is_rebuilt(demo_root, tmp_path, caplog):
    paths = ScanPaths(demo_root, tmp_path / "out")
    paths.out_dir.mkdir()
    paths.probe_cache.write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING):
        result = run(ScanParams(workers=1), paths)
    assert result.probed == 22
    assert "unreadable probe cache" in caplog.text


def test_caption_edit_changes_images_table_only_in_caption(demo_root, tmp_path):
    paths = ScanPaths(demo_root, tmp_path / "out")
    before = {row["path"]: row for row in read_table_after(run, paths)}
    files_before = paths.files.read_bytes()
    (demo_root / "train/10_sks circle/circle_01.txt").write_text("an edited caption\n")
    after = {row["path"]: row for row in read_table_after(run, paths)}
    changed = {path for path in before if before[path] != after[path]}
    assert changed == {"train/10_sks circle/circle_01.png"}
    assert paths.files.read_bytes() == files_before  # the pixel stages' input did not change
    assert after["train/10_sks circle/circle_01.png"]["caption"] == "an edited caption"


def read_table_after(runner, paths):
    runner(ScanParams(workers=1), paths)
    return read_table(paths.images)


def test_dangling_symlink_is_rejected_not_fatal(tmp_path):
    write_image(tmp_path / "train/1_x/a.png")
    (tmp_path / "train/1_x/gone.png").symlink_to(tmp_path / "train/1_x/deleted.png")
    images, rejected, _ = scan_rows(tmp_path)
    assert rejected["train/1_x/gone.png"]["reason"] == "unreadable"
    assert "FileNotFoundError" in rejected["train/1_x/gone.png"]["detail"]
    assert list(images) == ["train/1_x/a.png"]


def test_probe_reads_bytes_not_names(tmp_path):
    path = tmp_path / "actually_png.jpg"
    path.write_bytes(image_bytes((100, 80)))
    probe = probe_image(str(path), max_pixels=10**8)
    assert (probe["format"], probe["width"], probe["height"], probe["reason"]) == ("PNG", 100, 80, None)
    assert probe["image_id"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_interrupted_scan_keeps_decoded_images_and_resumes(demo_root, tmp_path, monkeypatch):
    import pipeline.scan as scan_module

    paths = ScanPaths(demo_root, tmp_path / "out")
    real_probe = scan_module.probe_image
    calls = []

    def killed_after_five(path, max_pixels):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(path)
        return real_probe(path, max_pixels)

    monkeypatch.setattr(scan_module, "probe_image", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        run(ScanParams(workers=1), paths)
    assert not paths.images.exists()
    assert len(read_table(paths.probe_cache)) == 5
    monkeypatch.setattr(scan_module, "probe_image", real_probe)
    resumed = run(ScanParams(workers=1), paths)
    assert (resumed.probed, resumed.reused) == (17, 5)
    assert len(read_table(paths.images)) == 22



def test_files_table_has_pixels_identity_and_mask_digest(demo_root, tmp_path):
    paths = ScanPaths(demo_root, tmp_path / "out")
    run(ScanParams(workers=1), paths)
    files = {row["path"]: row for row in read_table(paths.files)}
    assert set(files) == {row["path"] for row in read_table(paths.images)}
    masked = files["train/10_sks circle/circle_03.png"]
    mask_bytes = (demo_root / "train/10_sks circle/circle_03-masklabel.png").read_bytes()
    assert masked["mask_sha256"] == hashlib.sha256(mask_bytes).hexdigest()
    assert files["train/10_sks circle/circle_05.png"]["flip_p"] == 0.5
    assert "caption" not in files["train/10_sks circle/circle_05.png"]


def test_an_empty_train_folder_fails_with_the_layout_hint(tmp_path):
    root = tmp_path / "raw"
    (root / "train" / "10_sks dog").mkdir(parents=True)
    with pytest.raises(EmptyDataset) as error:
        run(CFG, ScanPaths(root, tmp_path / "scan"))
    assert str(error.value) == (
        f"{root}: no images to train on: no image files found. Put images in {root}/train/<repeats>_<class tokens>/ "
        f"(for example '{root}/train/10_sks dog/'), or run `kiln demo-data`."
    )


def test_only_rejected_images_fails_naming_how_many_and_keeps_rejected_parquet(tmp_path):
    root, out = tmp_path / "raw", tmp_path / "scan"
    write_image(root / "train/1_x/small.png", size=(16, 16))
    (root / "train/1_x/empty.png").write_bytes(b"")
    paths = ScanPaths(root, out)
    # An earlier scan's tables go: no later stage may run on a dataset that is no longer there.
    for table in (paths.images, paths.files):
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_bytes(b"stale")
    with pytest.raises(EmptyDataset) as error:
        run(CFG, paths)
    assert str(error.value) == (
        f"{root}: no images to train on: 2 files found, all rejected (see {out / 'rejected.parquet'}). "
        f"Put images in {root}/train/<repeats>_<class tokens>/ (for example '{root}/train/10_sks dog/'), "
        "or run `kiln demo-data`."
    )
    assert [(row["path"], row["reason"]) for row in read_table(paths.rejected)] == [
        ("train/1_x/empty.png", "empty"), ("train/1_x/small.png", "too_small"),
    ]
    assert not paths.images.exists() and not paths.files.exists()
