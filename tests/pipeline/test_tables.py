import contextlib
import json
import os
import pathlib
from collections.abc import Iterator

import pyarrow as pa
import pytest

from pipeline.tables import read_table, write_json, write_table

SCHEMA = pa.schema([("image_id", pa.string()), ("width", pa.int32()), ("tags", pa.list_(pa.string()))])
ROWS = [{"image_id": "a", "width": 3, "tags": ["x"]}, {"image_id": "b", "width": 4, "tags": []}]


def test_same_rows_same_bytes(tmp_path):
    write_table(ROWS, SCHEMA, tmp_path / "one.parquet")
    write_table([dict(row) for row in ROWS], SCHEMA, tmp_path / "two.parquet")
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()
    assert read_table(tmp_path / "one.parquet") == ROWS


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "t.parquet"
    write_table(ROWS, SCHEMA, path)
    before = path.read_bytes()
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        write_table([{"image_id": "c", "width": "not a number", "tags": []}], SCHEMA, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_json_is_sorted_and_stable(tmp_path):
    write_json({"b": 1, "a": {"d": 2, "c": 3}}, tmp_path / "s.json")
    text = (tmp_path / "s.json").read_text()
    assert text == '{\n  "a": {\n    "c": 3,\n    "d": 2\n  },\n  "b": 1\n}\n'
    assert json.loads(text)["a"]["c"] == 3


def test_io_error_names_the_file(tmp_path, monkeypatch):
    import errno

    from pipeline.errors import KilnError
    from pipeline.tables import pq

    def full_disk(table, where, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(KilnError, match=r"t.parquet: could not write \(\[Errno 28\] No space left on device\)"):
        write_table(ROWS, SCHEMA, tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: b"", "Parquet file size is 0 bytes"),
        (lambda data: data[: len(data) // 2], "Parquet magic bytes not found in footer"),
        # A damaged page header: pyarrow raises an OSError that names no file.
        (lambda data: data[:4] + bytes(40) + data[44:], "Couldn't deserialize thrift"),
    ],
    ids=["zero-bytes", "truncated", "damaged-page"],
)
def test_a_damaged_table_is_one_line_naming_the_file_and_who_writes_it(tmp_path, damage, reason):
    from pipeline.tables import DamagedTable

    path = tmp_path / "keys.parquet"
    write_table(ROWS, SCHEMA, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DamagedTable) as raised:
        read_table(path, written_by="cache")
    message = str(raised.value)
    assert message.startswith(f"{path}: damaged, not a readable Parquet file (")
    assert reason in message and message.endswith("); rerun `kiln cache`") and "\n" not in message
    assert str(path) not in message[len(str(path)) :]  # pyarrow's own copy of the path is dropped
    with pytest.raises(DamagedTable, match=r"; rerun the stage that writes it$"):
        read_table(path)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    """The process umask set to `value` within the block (shared by the tests of every writer)."""
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640)])
def test_tables_and_json_get_the_mode_the_umask_gives(tmp_path, mask, mode):
    # mkstemp alone would leave both 0o600 whatever the umask: unreadable to a UI running as another user.
    with umask(mask):
        write_table(ROWS, SCHEMA, tmp_path / "t.parquet")
        write_json({"a": 1}, tmp_path / "s.json")
    assert {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()} == {"t.parquet": mode, "s.json": mode}


def test_the_umask_is_honoured_and_kept_where_proc_cannot_tell_it(tmp_path, monkeypatch):
    # macOS and Windows have no /proc: the umask is read by setting and restoring it.
    real_read_text = pathlib.Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self) == "/proc/self/status":
            raise FileNotFoundError(str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", no_proc)
    with umask(0o027):
        write_json({"a": 1}, tmp_path / "s.json")
        assert os.umask(0o027) == 0o027  # still the user's
    assert (tmp_path / "s.json").stat().st_mode & 0o777 == 0o640
