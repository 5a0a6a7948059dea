"""Local folders and object stores behind one path type (universal-pathlib / fsspec).

`FLUX2_OUTPUT_DIR` may be a folder or an `s3://bucket/prefix` URI; everything that
writes datasets goes through `as_path` and `atomic_writer`, so the same code lands
files on disk or in a bucket. S3 credentials and endpoint come from the usual AWS
variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, ...).

Example::

    root = as_path("s3://my-bucket/flux2")
    with atomic_writer(root / "flux2_edits" / "cats.parquet") as handle:
        pq.write_table(table, handle)
    presign("s3://my-bucket/refs/cat.png", expires=3600)  # an https URL the API can fetch
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import urlsplit

# pyarrow imports pandas the first time it turns Python rows into a batch: imported here,
# that 0.1 s is paid at start, not on the event loop, where it would stall every job.
import fsspec
import pandas  # noqa: F401
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

REMOTE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"})
PRESIGNABLE_SCHEMES = frozenset({"s3", "s3a"})
_LOCAL_SCHEMES = frozenset({"", "file", "local"})


def is_remote_uri(text: str) -> bool:
    """True for object-store URIs such as `s3://bucket/key`."""
    return urlsplit(text).scheme.lower() in REMOTE_SCHEMES


def is_fsspec_uri(text: str) -> bool:
    """True for a `scheme://...` URI of any filesystem fsspec knows, other than local files.

    >>> is_fsspec_uri("s3://bucket/prompts"), is_fsspec_uri("memory://prompts")
    (True, True)
    >>> is_fsspec_uri("data/prompts"), is_fsspec_uri("file:///data/prompts")
    (False, False)
    """
    scheme, separator, _ = text.partition("://")
    scheme = scheme.lower()
    return (
        bool(separator) and scheme not in _LOCAL_SCHEMES and scheme in fsspec.available_protocols()
    )


def as_path(location: str | os.PathLike[str]) -> UPath:
    """A path object for a local folder or an object-store URI.

    >>> as_path("data/output").protocol
    ''
    >>> as_path("s3://bucket/prefix").protocol
    's3'
    """
    text = os.fspath(location)
    if is_remote_uri(text) or is_fsspec_uri(text):
        return UPath(text)
    return UPath(Path(text).expanduser().absolute())


def ensure_upath(path: str | os.PathLike[str] | UPath) -> UPath:
    """`path` itself when it is a `UPath`, else `as_path(path)` (plain `Path`s, strings)."""
    return path if isinstance(path, UPath) else as_path(path)


def is_local(path: UPath) -> bool:
    """True when `path` is on the local filesystem."""
    return path.protocol in ("", "file", "local")


def local_path(path: UPath) -> Path:
    """The `pathlib.Path` of a local `UPath`."""
    return Path(path.path)


def make_dirs(path: UPath) -> None:
    """Create a local folder and its parents; object stores have no folders to create."""
    if is_local(path):
        local_path(path).mkdir(parents=True, exist_ok=True)


def local_file_size(path: str | os.PathLike[str]) -> int | None:
    """The size in bytes of the local file at `path`, or None when there is no such file."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def file_size(path: UPath) -> int | None:
    """The size in bytes of the file at `path`, or None when there is no such file."""
    if is_local(path):
        return local_file_size(local_path(path))
    try:
        details = path.fs.info(path.path)
    except FileNotFoundError:
        return None
    if details.get("type") != "file":
        return None
    return int(details.get("size") or 0)


REMOTE_READ_BLOCK_BYTES = 4 << 20
"""Reads from an object store fetch byte ranges of 4 MiB: fsspec's own default (50 MiB for
s3fs, with read-ahead) would hold a whole 50 MiB of a large table in memory at once."""


def open_for_reading(path: UPath) -> IO[bytes]:
    """A binary file handle on a local file or an object (ranged reads of
    `REMOTE_READ_BLOCK_BYTES`), so a caller streams it in bounded memory.

    Example::

        with open_for_reading(as_path("s3://bucket/prompts/cats.parquet")) as handle:
            magic = handle.read(4)  # b"PAR1"
    """
    if is_local(path):
        return open(local_path(path), "rb")
    handle: IO[bytes] = path.fs.open(path.path, "rb", block_size=REMOTE_READ_BLOCK_BYTES)
    return handle


@dataclass(frozen=True)
class ListedFile:
    """A file found by `list_files`: its path, size, and a signature of its version."""

    path: UPath
    size: int
    signature: str | None
    """Changes whenever the content may have: size and mtime locally; size and the
    object's version, ETag or modification time in a store. None when the store reports
    none of them (the caller must then read the content to know)."""


# Object metadata that changes with the content, the most precise first (S3, GCS, Azure,
# then modification times; fsspec's memory filesystem only has `created`).
_VERSION_FIELDS = (
    "VersionId",
    "generation",
    "ETag",
    "etag",
    "md5Hash",
    "LastModified",
    "last_modified",
    "updated",
    "mtime",
    "created",
)


def list_files(folder: UPath, suffix: str) -> list[ListedFile]:
    """The files directly in `folder` whose names end with `suffix`, sorted by name.

    One listing call for an object store, asked afresh each time (fsspec caches listings
    in long-lived processes, such as a code server evaluating a sensor); an absent folder
    or prefix has no files. Names starting with a dot are left out.

    Example::

        [f.path.name for f in list_files(as_path("s3://bucket/prompts"), ".parquet")]
    """
    if is_local(folder):
        return _list_local(local_path(folder), suffix)
    fs = folder.fs
    fs.invalidate_cache(folder.path)
    try:
        entries = fs.ls(folder.path, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = str(entry.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "file" or name.startswith(".") or not name.endswith(suffix):
            continue
        size = int(entry.get("size") or 0)
        version = next((f"{k}={entry[k]}" for k in _VERSION_FIELDS if entry.get(k)), None)
        found.append(ListedFile(folder / name, size, version and f"{size}:{version}"))
    return sorted(found, key=lambda listed: listed.path.name)


def _list_local(folder: Path, suffix: str) -> list[ListedFile]:
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob(f"*{suffix}")):
        if path.name.startswith("."):
            continue
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed since the listing
        if stat.S_ISREG(info.st_mode):
            signature = f"{info.st_size}:{info.st_mtime_ns}"
            found.append(ListedFile(as_path(path), info.st_size, signature))
    return found


STREAM_BATCH_ROWS = 1024
STREAM_BUFFER_BYTES = 1 << 16
"""`iter_parquet` reads column chunks through a 64 KiB buffer, page by page: memory then
depends on the batch and page size, not on the file (see `batch.tables.READ_BUFFER_BYTES`
for the figures)."""


def iter_parquet(
    path: UPath, columns: Sequence[str] | None = None, batch_rows: int = STREAM_BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """Stream a Parquet file (local or in an object store) as record batches of `columns`
    (every column when None).

    Unlike `pq.read_table`, memory does not grow with the file: single-threaded, no
    pre-buffering, column chunks read through a small buffer.

    Example::

        failed = sum(
            pc.sum(pc.equal(batch["status"], "failed")).as_py() or 0
            for batch in iter_parquet(as_path("out/flux2_edits/cats.parquet"), ["status"])
        )
    """
    with (
        open(local_path(path), "rb") if is_local(path) else path.fs.open(path.path, "rb")
    ) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=STREAM_BUFFER_BYTES)
        try:
            yield from parquet.iter_batches(
                batch_size=batch_rows,
                columns=None if columns is None else list(columns),
                use_threads=False,
            )
        finally:
            parquet.close()


SCRATCH_CACHE_KIB = 2048
"""Page cache of a `ScratchDatabase`: bounded, so memory does not grow with its rows."""
INDEX_CHUNK = 1024

IndexKey = tuple[str | int | None, ...]


class ScratchDatabase:
    """An SQLite file in a private temporary folder, for lookups too big for memory.

    Never synced (whatever it holds is rebuilt on every run), with a page cache bounded
    to `cache_kib`, so memory does not grow with its rows; `close` deletes the folder.
    `schema` is the SQL that creates its tables; `name` names the folder and the file.

    Example::

        with ScratchDatabase("seen", "CREATE TABLE seen (v TEXT PRIMARY KEY)") as db:
            db.write_many("INSERT OR IGNORE INTO seen (v) VALUES (?)", [("a",), ("a",)])
            db.execute("SELECT count(*) FROM seen").fetchone()  # (1,)
    """

    def __init__(self, name: str, schema: str, cache_kib: int = SCRATCH_CACHE_KIB) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix=f"flux2-{name}-")
        self._db = sqlite3.connect(Path(self._folder.name) / f"{name}.sqlite", isolation_level=None)
        self._db.executescript(
            "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA temp_store = FILE; "
            f"PRAGMA cache_size = -{int(cache_kib)};\n{schema}"
        )

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run one statement on its own (autocommitted)."""
        return self._db.execute(sql, parameters)

    def write_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run `sql` once for each row of parameters, all in one transaction."""
        self._db.execute("BEGIN")
        self._db.executemany(sql, rows)
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database and delete its folder."""
        self._db.close()
        self._folder.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DiskIndex(ScratchDatabase):
    """A temporary map from keys to JSON values, in a `ScratchDatabase`.

    For the lookups a step makes across a whole partition (an image manifest by row, a
    preset by row id) in memory that does not grow with the rows. A later `put_all` of a
    key replaces the earlier value, as in a dict.

    Example::

        with DiskIndex() as sizes:
            sizes.put_all(((row_id,), size) for row_id, size in [("row-1", "square_hd")])
            sizes.get(("row-1",)), sizes.get(("row-2",))  # ("square_hd", None)
    """

    def __init__(self) -> None:
        super().__init__(
            "index",
            "CREATE TABLE entries (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        )

    def put_all(self, items: Iterable[tuple[IndexKey, Any]]) -> None:
        """Add (key, value) pairs, in order; a key seen before takes the newer value."""
        chunk: list[tuple[str, str]] = []
        for key, value in items:
            chunk.append((repr(key), json.dumps(value)))
            if len(chunk) >= INDEX_CHUNK:
                self._insert(chunk)
                chunk = []
        self._insert(chunk)

    def _insert(self, rows: list[tuple[str, str]]) -> None:
        if rows:
            self.write_many("INSERT OR REPLACE INTO entries (key, value) VALUES (?, ?)", rows)

    def get(self, key: IndexKey) -> Any:
        """The value stored under `key`, or None when there is none."""
        found = self.execute("SELECT value FROM entries WHERE key = ?", (repr(key),)).fetchone()
        return None if found is None else json.loads(found[0])

    def clear(self) -> None:
        """Drop every entry."""
        self.execute("DELETE FROM entries")


class AtomicFile:
    """A file whose bytes appear at `path` only when `commit` is called.

    Locally: a temporary file in the same folder, flushed to disk and renamed into place
    on `commit`, so not even a power loss can leave a half file under the name. In an
    object store: the bytes are staged in a local temporary file and uploaded in one put
    on `commit`; fsspec's own file objects would upload on close even after an error.
    `abort` drops the temporary file and leaves whatever was at `path` as it was.

    Example::

        target = AtomicFile(as_path("s3://bucket/out/cats.parquet"))
        try:
            pq.write_table(table, target.handle)
        except BaseException:
            target.abort()
            raise
        target.commit()
    """

    def __init__(self, path: UPath) -> None:
        self.path = path
        self._staging: tempfile.TemporaryDirectory[str] | None = None
        if is_local(path):
            target = local_path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        else:
            self._staging = tempfile.TemporaryDirectory(prefix="flux2-upload-")
            self._temporary = Path(self._staging.name) / "object"
        self.handle: IO[bytes] = self._temporary.open("wb")
        self.done = False

    def commit(self) -> None:
        """Make the bytes written so far appear at `path` (once; later calls do nothing)."""
        if self.done:
            return
        try:
            self.handle.flush()
            if self._staging is None:
                os.fsync(self.handle.fileno())
            self.handle.close()
            if self._staging is None:
                os.replace(self._temporary, local_path(self.path))
            else:
                self.path.fs.put_file(str(self._temporary), self.path.path)
        except BaseException:
            self.abort()
            raise
        self._cleanup()

    def abort(self) -> None:
        """Drop what was written; `path` keeps its previous content (if any)."""
        if self.done:
            return
        self.handle.close()
        self._cleanup()

    def _cleanup(self) -> None:
        self.done = True
        self._temporary.unlink(missing_ok=True)
        if self._staging is not None:
            self._staging.cleanup()


@contextmanager
def atomic_writer(path: UPath) -> Iterator[IO[bytes]]:
    """An `AtomicFile`'s handle: committed if the block succeeds, aborted if it raises."""
    target = AtomicFile(path)
    try:
        yield target.handle
    except BaseException:
        target.abort()
        raise
    target.commit()


STREAM_FLUSH_ROWS = 1024
STREAM_ROW_GROUP_ROWS = 16_384
"""Rows a `ParquetStreamWriter` holds as Python dicts, then as Arrow, before it writes a row
group: both bounded, so a file of any length is written in the same memory."""


class ParquetStreamWriter:
    """Rows streamed into a Parquet file that appears at `path` only on `commit`.

    The bytes go to an `AtomicFile`, so readers never see a half-written file and `abort`
    (or an exception in a `with` block) leaves the previous file as it was. A file with no
    rows still has the schema.

    Example::

        schema = pa.schema([("n", pa.int64())])
        with ParquetStreamWriter(as_path("out/sizes.parquet"), schema) as out:
            out.write_row({"n": 1})
        out.rows_written  # 1
    """

    def __init__(
        self,
        path: UPath,
        schema: pa.Schema,
        flush_rows: int = STREAM_FLUSH_ROWS,
        row_group_rows: int = STREAM_ROW_GROUP_ROWS,
    ) -> None:
        self.path, self.schema = path, schema
        self.rows_written = 0
        self._flush_rows, self._row_group_rows = flush_rows, row_group_rows
        self._pending: list[dict[str, Any]] = []
        self._batches: list[pa.RecordBatch] = []
        self._batched_rows = 0
        self._target = AtomicFile(path)
        self._writer = pq.ParquetWriter(self._target.handle, schema, compression="zstd")

    def write_row(self, row: dict[str, Any]) -> None:
        """Append one row, keyed by the schema's names."""
        self._pending.append(row)
        if len(self._pending) >= self._flush_rows:
            self._to_arrow()
            if self._batched_rows >= self._row_group_rows:
                self._write_row_group()

    def _to_arrow(self) -> None:
        if self._pending:
            batch = pa.RecordBatch.from_pylist(self._pending, schema=self.schema)
            self._batches.append(batch)
            self._batched_rows += batch.num_rows
            self._pending = []

    def _write_row_group(self) -> None:
        if self._batches:
            table = pa.Table.from_batches(self._batches, schema=self.schema)
            self._writer.write_table(table, row_group_size=table.num_rows)
            self.rows_written += table.num_rows
            self._batches, self._batched_rows = [], 0

    def commit(self) -> None:
        """Finish the file and move it into place (rename locally, one upload remotely)."""
        try:
            self._to_arrow()
            self._write_row_group()
            self._writer.close()
        except BaseException:
            self._target.abort()
            raise
        self._target.commit()

    def abort(self) -> None:
        """Drop what was written; the file at `path` (if any) stays as it was."""
        try:
            self._writer.close()
        finally:
            self._target.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_bytes_atomically(path: UPath, data: bytes) -> None:
    """Write `data` to `path` with `atomic_writer`."""
    with atomic_writer(path) as handle:
        handle.write(data)


def presign(uri: str, expires: int) -> str:
    """An https URL for an `s3://` object that stays valid for `expires` seconds.

    The API fetches reference images itself, so private objects need pre-signed URLs.
    """
    path = UPath(uri)
    if path.protocol not in PRESIGNABLE_SCHEMES:
        raise ValueError(f"cannot pre-sign {uri!r}: only s3:// URIs can be signed")
    signer: Any = path.fs
    return str(signer.url(path.path, expires=expires))


READABLE_OBJECT_SCHEMES = frozenset({"s3", "s3a"})
"""Object-store URI schemes whose objects `read_object` fetches (reference images)."""


class ObjectTooLarge(ValueError):
    """The object is bigger than the caller's byte cap; nothing beyond the cap was read."""


def is_readable_object_uri(text: str) -> bool:
    """True for URIs `read_object` can read, such as `s3://bucket/key`.

    >>> is_readable_object_uri("s3://bucket/refs/cat.png"), is_readable_object_uri("https://x")
    (True, False)
    """
    scheme, separator, _ = text.partition("://")
    return bool(separator) and scheme.lower() in READABLE_OBJECT_SCHEMES


def read_object(uri: str, max_bytes: int) -> bytes:
    """The bytes of the object at `uri` (`s3://bucket/key`), at most `max_bytes` of them.

    Raises `FileNotFoundError` when there is no such object and `ObjectTooLarge` when it
    is bigger than `max_bytes` (checked from its listed size, then while reading).

    Example::

        data = read_object("s3://my-bucket/refs/cat.png", max_bytes=32 << 20)
    """
    if not is_readable_object_uri(uri):
        raise ValueError(f"cannot read {uri!r}: only s3:// objects are read")
    path = UPath(uri)
    details = path.fs.info(path.path)
    if details.get("type") != "file":
        raise FileNotFoundError(f"no object at {uri}")
    size = int(details.get("size") or 0)
    if size > max_bytes:
        raise ObjectTooLarge(f"{size} bytes is more than the {max_bytes}-byte cap")
    with path.fs.open(path.path, "rb") as handle:
        data: bytes = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ObjectTooLarge(f"more than the {max_bytes}-byte cap (stopped reading)")
    return data
