import json

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
