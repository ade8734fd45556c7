import hashlib

import pytest
from PIL import Image

from pipeline.demo_data import IMAGES, write_demo_data
from pipeline.errors import KilnError


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_data_is_deterministic_and_rewrites_nothing_unchanged(tmp_path):
    first = write_demo_data(tmp_path / "a")
    write_demo_data(tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    again = write_demo_data(tmp_path / "a")
    assert again["files_written"] == 0 and again["files_unchanged"] == first["files_written"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_demo_data_covers_what_real_datasets_contain(demo_source):
    files = digest(demo_source)
    assert {f.split("/")[1] for f in files if "/" in f} >= {"10_sks circle", "5_sks square", "1_shape"}
    assert "train/10_sks circle/local.yaml" in files
    assert "train/5_sks square/batch_id.txt" in files
    assert sum(f.endswith(".yaml") and "local" not in f for f in files) >= 2
    assert sum(f.endswith(".txt") and "batch_id" not in f for f in files) >= 5
    assert "train/10_sks circle/circle_03-masklabel.png" in files
    sizes = [spec.size for spec in IMAGES]
    ratios = {w / h for w, h in sizes}
    assert 1.0 in ratios and 4.0 in ratios and 0.25 in ratios
    assert any(r > 1 for r in ratios) and any(r < 1 for r in ratios)
    assert min(min(s) for s in sizes) == 300 and max(max(s) for s in sizes) == 1600
    with Image.open(demo_source / "train/10_sks circle/circle_08.png") as alpha:
        assert alpha.mode == "RGBA"
        assert alpha.getextrema()[3] == (0, 255)


def test_demo_data_refuses_a_folder_holding_other_files(tmp_path):
    root = tmp_path / "raw"
    (root / "train/10_me").mkdir(parents=True)
    (root / "train/10_me/photo.jpg").write_bytes(b"not the demo's")
    with pytest.raises(KilnError) as refused:
        write_demo_data(root)
    assert str(refused.value) == (
        f"{root}: holds 1 file(s) the demo did not write (train/10_me/photo.jpg); the demo writes only into an "
        "empty folder or its own earlier output. Train your own images with `dvc repro` (scan.data_root), or "
        "give the demo another folder with --out"
    )
    assert [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()] == ["train/10_me/photo.jpg"]


def test_demo_data_refuses_an_edited_demo_file_and_writes_nothing(tmp_path):
    root = tmp_path / "raw"
    write_demo_data(root)
    caption = root / "train/10_sks circle/circle_01.txt"
    caption.write_text("my own caption\n")
    before = digest(root)
    with pytest.raises(KilnError, match=r"holds 1 file\(s\) the demo did not write \(train/10_sks circle/circle_01.txt\)"):
        write_demo_data(root)
    assert digest(root) == before
