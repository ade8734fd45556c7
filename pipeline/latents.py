"""The latent store: content-addressed samples in plain tar shards, and an index for random access.

data/latents/
    index.parquet              one row per sample: cache_key -> shard, byte offset, size, sha256, shapes
    manifest.parquet           (cache_key, sha256) per sample: what downstream stages depend on
    summary.json               what the last run encoded, reused, repaired and left as garbage
    <group>/shard-<hash>.tar   one shard set per group (a bucket, e.g. 512x768); webdataset reads them

Each sample is two tar members sharing its key (webdataset's convention): `<cache_key>.safetensors`
(the tensors; never pickle) and `<cache_key>.json` (its index fields, so a shard whose index entry was
lost to a kill can be adopted back). Shards are written under a temporary name, fsynced and renamed;
the index is written last, the same way. Tar headers carry mtime 0 and no owner, so identical samples
give identical bytes. A second kind of entry (text embeddings keyed by caption, encoder and clip_skip)
fits the same mechanism: its own `kind`, its own group, the same shards and index.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pipeline.errors import KilnError
from pipeline.tables import read_table, write_json, write_table

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema(
    [
        ("cache_key", pa.string()),
        ("kind", pa.string()),
        ("image_id", pa.string()),
        ("flip", pa.bool_()),
        ("bucket", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("sha256", pa.string()),
        ("shape", pa.list_(pa.int32())),
        ("dtype", pa.string()),
        ("has_mask", pa.bool_()),
        ("original_size", pa.list_(pa.int32())),
        ("crop_top_left", pa.list_(pa.int32())),
        ("target_size", pa.list_(pa.int32())),
    ]
)
# data/latents/manifest.parquet: which latents the store holds and their content hashes, nothing about
# where they lie. What balance and train depend on: settling, repair or a rebuild move shards and
# offsets (the index changes) but leave the manifest's bytes alone, so those stages do not rerun.
MANIFEST_SCHEMA = pa.schema([("cache_key", pa.string()), ("sha256", pa.string())])
# Index fields that describe the sample itself; the rest say where it lives. Stored in the .json member.
META_FIELDS = [name for name in INDEX_SCHEMA.names if name not in ("shard", "offset", "size", "sha256")]


@dataclass
class Sample:
    """One entry to store: its key, its tensors, and its index fields (META_FIELDS)."""

    cache_key: str
    tensors: dict[str, Any]  # name -> torch.Tensor
    meta: dict[str, Any]
    raw: bytes | None = None  # already-serialised tensors, copied as they are (settling)

    def payload(self) -> bytes:
        return self.raw if self.raw is not None else save_tensors(self.tensors)

    def meta_bytes(self) -> bytes:
        return json.dumps({"cache_key": self.cache_key, **self.meta}, sort_keys=True).encode()


# Content-defined cuts fall every SHARD_SPACING samples on average (1 MiB of SD1.5 latents at 512 px, 4 MiB
# of SDXL's at 1024): the shard a new latent joins, which settle() rewrites, stays small. A quarter of
# cache.shard_max_count when that is smaller, so the count cap rarely cuts.
SHARD_SPACING = 16


def ends_shard(cache_key: str, max_count: int) -> bool:
    """Whether a shard ends after this key, decided by the key alone (content-defined cuts, as rsync and
    restic chunk files): adding or removing one sample moves the cuts around it only, so an incrementally
    built store can be laid out exactly as a fresh build by rewriting only the shards new samples join."""
    spacing = max(1, min(SHARD_SPACING, max_count // 4))
    return int.from_bytes(hashlib.sha256(cache_key.encode()).digest()[:4], "big") * spacing < 1 << 32


def layout(keys: list[str], sizes: list[int], max_count: int, max_bytes: int) -> list[tuple[int, int]]:
    """The shards of one group, as (start, stop) runs of its keys in sorted order: a run ends after a key
    that ends_shard(), and is cut short at max_count samples or before max_bytes of payload. Every cut
    depends only on the keys since the last content-defined one, so the layout of a key set is unique."""
    runs, start, used = [], 0, 0
    for index, (key, size) in enumerate(zip(keys, sizes, strict=True)):
        if index > start and used + size > max_bytes:
            runs.append((start, index))
            start, used = index, 0
        used += size
        if index + 1 - start >= max_count or ends_shard(key, max_count):
            runs.append((start, index + 1))
            start, used = index + 1, 0
    if start < len(keys):
        runs.append((start, len(keys)))
    return runs


def shard_name(group: str, keys: list[str]) -> str:
    """A shard's path in the store, from the keys it holds in order."""
    return f"{group}/shard-{hashlib.sha256(''.join(keys).encode()).hexdigest()[:16]}.tar"


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tar(handle: Any, samples: list[Sample], rel: str) -> dict[str, dict[str, Any]]:
    """The shard's bytes, written to an open binary file; its index rows by key."""
    rows: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            payload = sample.payload()
            # USTAR: a 512-byte header, then the data; our names fit in one header block.
            offset = tar.offset + tarfile.BLOCKSIZE
            tar.addfile(*_member(f"{sample.cache_key}.safetensors", payload))
            tar.addfile(*_member(f"{sample.cache_key}.json", sample.meta_bytes()))
            rows[sample.cache_key] = {
                "cache_key": sample.cache_key, **sample.meta, "shard": rel, "offset": offset,
                "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
            }
    return rows


@dataclass
class Verification:
    rows: dict[str, dict[str, Any]]
    damaged: list[str] = field(default_factory=list)
    repaired: int = 0


def is_remote(store: str | Path) -> bool:
    """Shards on object storage or behind a pipe: webdataset URLs such as s3://, https://, pipe:.
    Such a store is streamed in order (pipeline.loader); a local folder is read at random via the index."""
    return "://" in str(store) or str(store).startswith("pipe:")


def checked(payload: bytes, row: dict[str, Any], where: str | Path) -> bytes:
    """The payload, if it matches the index's sha256; otherwise the error that names the shard."""
    if hashlib.sha256(payload).hexdigest() != row["sha256"]:
        raise KilnError(
            f"{where}: latent {row['cache_key']} does not match its checksum; the shard is damaged. "
            "Rerun `kiln cache` to detect and re-encode it."
        )
    return payload


class LatentStore:
    def __init__(self, root: Path, keep_open: bool = False):
        self.root = Path(root)
        # A reader (the training loader) keeps its shards open: one open() per shard, not per sample.
        self.keep_open = keep_open
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Open files do not travel to DataLoader workers; each worker opens its own.
        return {**self.__dict__, "_handles": {}}

    def close(self) -> None:
        """Close the shards a kept-open reader holds."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    @property
    def index_path(self) -> Path:
        return self.root / "index.parquet"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    def load_index(self) -> dict[str, dict[str, Any]]:
        if not self.index_path.is_file():
            return {}
        return {row["cache_key"]: row for row in read_table(self.index_path, written_by="cache")}

    def write_index(self, rows: dict[str, dict[str, Any]]) -> None:
        """The index, and the manifest (cache_key, sha256) that stages downstream depend on."""
        ordered = [rows[key] for key in sorted(rows)]
        write_table([{"cache_key": row["cache_key"], "sha256": row["sha256"]} for row in ordered], MANIFEST_SCHEMA, self.manifest_path)
        write_table(ordered, INDEX_SCHEMA, self.index_path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(summary, self.summary_path)

    @contextlib.contextmanager
    def lock(self, timeout: float) -> Iterator[None]:
        """Exclusive writer lock: a second writer waits up to `timeout` seconds, then gets a clear error."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        handle = open(path, "a+")
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        handle.seek(0)
                        holder = handle.read().strip() or "unknown"
                        raise KilnError(
                            f"{self.root}: another `kiln cache` (pid {holder}) is writing this latent store. "
                            f"Wait for it to finish, or set cache.lock_timeout to wait for it."
                        ) from None
                    time.sleep(0.2)
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            handle.close()  # closing releases the flock

    def write_shard(self, group: str, samples: list[Sample]) -> dict[str, dict[str, Any]]:
        """Write one shard (temporary name, fsync, rename); return its index rows by key."""
        rel = shard_name(group, [sample.cache_key for sample in samples])
        path = self.root / rel
        name = path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.tmp")
        try:
            with open(tmp, "wb") as handle:
                rows = _write_tar(handle, samples, rel)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise KilnError(
                f"{path}: could not write this shard ({exc}); it was removed, and the index still lists only "
                "complete shards. Free some space and rerun: finished shards are kept."
            ) from exc
        return rows

    def read_bytes(self, row: dict[str, Any]) -> bytes:
        """One sample's serialised tensors through its index row, checked against its sha256."""
        path = self.root / row["shard"]
        if self.keep_open:
            if row["shard"] not in self._handles:
                self._handles[row["shard"]] = open(path, "rb")
            reading = contextlib.nullcontext(self._handles[row["shard"]])
        else:
            reading = open(path, "rb")
        with reading as handle:
            handle.seek(row["offset"])
            return checked(handle.read(row["size"]), row, path)

    def read(self, row: dict[str, Any]) -> dict[str, Any]:
        """Random access to one sample through its index row (checked)."""
        return load_tensors(self.read_bytes(row))

    def shard_files(self) -> list[Path]:
        return sorted(path for path in self.root.glob("*/*.tar") if path.is_file())

    def verify(self, rows: dict[str, dict[str, Any]]) -> Verification:
        """Check every indexed shard (_check_shard); a damaged shard is dropped whole, named, and deleted."""
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for row in rows.values():
            by_shard.setdefault(row["shard"], []).append(row)
        result = Verification(dict(rows))
        for shard, members in sorted(by_shard.items()):
            reason = self._check_shard(self.root / shard, members)
            if reason is None:
                continue
            log.warning("%s: %s; its %d latents will be encoded again", self.root / shard, reason, len(members))
            result.damaged.append(shard)
            result.repaired += len(members)
            for member in members:
                del result.rows[member["cache_key"]]
            (self.root / shard).unlink(missing_ok=True)
        return result

    @staticmethod
    def _check_shard(path: Path, members: list[dict[str, Any]]) -> str | None:
        """Why the shard is not exactly what its index rows say, or None. Beyond each payload's checksum,
        a reader depends on every tar header and every .json member (webdataset silently stops at the
        first bad header): the shard must equal, byte for byte, the tar that write_shard makes of its
        indexed payloads and fields, so any damage outside the payloads is found too."""
        if not path.is_file():
            return "missing"
        data = path.read_bytes()
        members = sorted(members, key=lambda member: member["offset"])
        samples = []
        for member in members:
            chunk = data[member["offset"] : member["offset"] + member["size"]]
            if len(chunk) != member["size"]:
                return "truncated"
            if hashlib.sha256(chunk).hexdigest() != member["sha256"]:
                return f"checksum mismatch for {member['cache_key']}"
            meta = {name: member[name] for name in META_FIELDS if name != "cache_key"}
            samples.append(Sample(member["cache_key"], {}, meta, chunk))
        expected = io.BytesIO()
        _write_tar(expected, samples, members[0]["shard"])
        if expected.getvalue() != data:
            return "its tar headers or .json members do not match the index"
        return None

    def adopt_orphans(self, rows: dict[str, dict[str, Any]]) -> int:
        """Index complete shards that a killed run wrote but never indexed; delete temporary files."""
        for tmp in self.root.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)
        indexed = {row["shard"] for row in rows.values()}
        adopted = 0
        for path in self.shard_files():
            rel = path.relative_to(self.root).as_posix()
            if rel in indexed:
                continue
            try:
                found = self._read_shard_rows(path, rel)
            except (OSError, tarfile.TarError, ValueError, KeyError) as exc:
                log.warning("%s: unreadable shard left by an earlier run (%s); removed", path, exc)
                path.unlink(missing_ok=True)
                continue
            new = {key: row for key, row in found.items() if key not in rows}
            if not new:
                path.unlink()  # every sample is already indexed elsewhere
                continue
            rows.update(new)
            adopted += len(new)
        return adopted

    @staticmethod
    def _read_shard_rows(path: Path, rel: str) -> dict[str, dict[str, Any]]:
        data = path.read_bytes()
        payloads: dict[str, tarfile.TarInfo] = {}
        metas: dict[str, dict[str, Any]] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                if suffix == "safetensors":
                    payloads[key] = member
                elif suffix == "json":
                    metas[key] = json.loads(data[member.offset_data : member.offset_data + member.size])
        rows = {}
        for key, member in payloads.items():
            payload = data[member.offset_data : member.offset_data + member.size]
            load_tensors(payload)  # raises on a damaged payload
            meta = {name: metas[key][name] for name in META_FIELDS}
            rows[key] = {
                **meta, "shard": rel, "offset": member.offset_data, "size": member.size,
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
        return rows

    def settle(self, rows: dict[str, dict[str, Any]], max_count: int, max_bytes: int) -> dict[str, dict[str, Any]]:
        """Lay the indexed samples out as a fresh build of the same keys would: a shard that already holds
        exactly one run of layout() stays as it is; other runs are rewritten from their stored bytes (never
        re-encoded). Then the index is written and shards it no longer names are deleted, so a store built
        up over many runs, repaired or collected is byte-identical to one built at once."""
        by_group: dict[str, list[dict[str, Any]]] = {}
        for key in sorted(rows):
            by_group.setdefault(rows[key]["bucket"], []).append(rows[key])
        source = LatentStore(self.root, keep_open=True)  # a rewritten run's samples come from a few shards
        settled: dict[str, dict[str, Any]] = {}
        for group, members in sorted(by_group.items()):
            runs = layout([row["cache_key"] for row in members], [row["size"] for row in members], max_count, max_bytes)
            for start, stop in runs:
                run = members[start:stop]
                # A shard's name hashes its keys in order: the same name is the same members, the same bytes.
                name = shard_name(group, [row["cache_key"] for row in run])
                if all(row["shard"] == name for row in run):
                    settled.update((row["cache_key"], row) for row in run)
                    continue
                samples = [
                    Sample(row["cache_key"], {}, {name: row[name] for name in META_FIELDS if name != "cache_key"}, source.read_bytes(row))
                    for row in run
                ]
                settled.update(self.write_shard(group, samples))
        source.close()
        self.write_index(settled)
        live = {row["shard"] for row in settled.values()}
        for path in self.shard_files():
            if path.relative_to(self.root).as_posix() not in live:
                path.unlink()
        return settled
