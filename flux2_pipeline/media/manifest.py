"""The image manifest: one row per image of every completed row of a partition.

An `ImageRef` is an image the results table points at (a reference image the row sent,
role `source`, or an output image, role `edited`); an `ImageRecord` is that reference
after the sync: stored (`status` "ok", with its sha256 and verified description),
failed (`status` "failed", with the reason in `error`), or, for an output the API no
longer serves, `expired`.

Both ends stream: `iter_image_refs` reads the results in record batches, and a
`ManifestWriter` writes records as they come into a file that appears only when complete.

Example::

    refs = iter_image_refs(iter_parquet(as_path("data/output/flux2_edits/cats.parquet")))
    with ManifestWriter(Path("data/output/flux2_images/cats.parquet")) as manifest:
        for record in records:
            manifest.write(record)
    previous = read_manifest(Path("data/output/flux2_images/cats.parquet"))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from flux2_pipeline.paths import (
    DiskIndex,
    ParquetStreamWriter,
    ensure_upath,
    file_size,
    iter_parquet,
)

Role = Literal["source", "edited"]

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("request_id", pa.string()),
        pa.field("role", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("path", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("format", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("verified", pa.string()),
        pa.field("note", pa.string()),
    ]
)
"""The manifest's schema (docs/data.md, "Images")."""

MANIFEST_COLUMN_DESCRIPTIONS: dict[str, str] = {
    "row_id": "the results row the image belongs to",
    "request_id": "the API job that produced the row",
    "role": "source (a reference image sent) or edited (an output image)",
    "index": "position in image_urls (source) or output_urls (edited)",
    "url": "where the image was fetched from",
    "sha256": "sha256 of the stored bytes; null if the image failed",
    "path": "the stored file, relative to FLUX2_OUTPUT_DIR",
    "width": "pixels, from the image's header",
    "height": "pixels, from the image's header",
    "format": "Pillow's format name (PNG, JPEG, WEBP)",
    "bytes": "size of the stored file",
    "status": "ok, failed, or expired (an output the API no longer serves; paid, not resubmitted)",
    "error": "why the image is missing, when failed",
    "verified": "how the stored bytes were checked: png-stream (chunk CRCs, pixel stream "
    "inflated and counted), jpeg-draft (every scan decoded at 1/8 scale), pixels (fully "
    "decoded) or header (above the decode ceiling: dimensions only)",
    "note": "why a stored image was not decoded (and has no thumbnail)",
}


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image a completed results row points at."""

    row_id: str
    request_id: str | None
    role: Role
    index: int
    url: str


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One manifest row: an `ImageRef` and what became of it."""

    row_id: str
    request_id: str | None
    role: str
    index: int
    url: str
    status: str
    sha256: str | None = None
    path: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    bytes: int | None = None
    error: str | None = None
    verified: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        """True when the image is stored and verified."""
        return self.status == "ok"

    def row(self) -> dict[str, Any]:
        """The record as a dict keyed by `MANIFEST_SCHEMA` names."""
        # Every field is a str, int or None: no deep copy (`asdict`) needed, and it took
        # most of the time of indexing a large manifest.
        return {name: getattr(self, name) for name in _RECORD_FIELDS}


_RECORD_FIELDS = tuple(field.name for field in fields(ImageRecord))

Results: TypeAlias = pa.Table | Iterable[pa.RecordBatch]
"""A results table, whole or as record batches (`iter_parquet`, which keeps memory flat)."""


def completed_rows(results: Results, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """`columns` of each completed results row, in row order, one record batch at a time.

    >>> table = pa.table({"row_id": ["a", "b"], "status": ["failed", "completed"]})
    >>> list(completed_rows(table, ["row_id"]))
    [{'row_id': 'b'}]
    """
    batches = results.to_batches() if isinstance(results, pa.Table) else results
    for batch in batches:
        completed = batch.filter(pc.equal(batch["status"], "completed"))
        yield from completed.select(list(columns)).to_pylist()


def iter_image_refs(results: Results) -> Iterator[ImageRef]:
    """The images of every completed row, in row order: its sources, then its edits.

    Lazy: with `iter_parquet` batches, memory does not grow with the results.

    >>> table = pa.table({"row_id": ["a"], "request_id": ["r"], "status": ["completed"],
    ...                   "image_urls": [["https://x/in.png"]], "output_urls": [["https://x/o.png"]]})
    >>> [(ref.role, ref.url) for ref in iter_image_refs(table)]
    [('source', 'https://x/in.png'), ('edited', 'https://x/o.png')]
    """
    columns = ["row_id", "request_id", "image_urls", "output_urls"]
    for row in completed_rows(results, columns):
        for index, url in enumerate(row["image_urls"] or []):
            yield ImageRef(row["row_id"], row["request_id"], "source", index, url)
        for index, url in enumerate(row["output_urls"] or []):
            yield ImageRef(row["row_id"], row["request_id"], "edited", index, url)


def image_refs(results: Results) -> list[ImageRef]:
    """`iter_image_refs` as a list (small tables; a partition's step streams instead)."""
    return list(iter_image_refs(results))


def iter_manifest(path: Path | UPath) -> Iterator[ImageRecord]:
    """The manifest's records in order, read in record batches; none when there is no file.

    Raises Arrow's or the file system's error on a damaged file, possibly after some
    records: `read_manifest` and `ManifestIndex` treat a damaged manifest as empty.
    """
    target = ensure_upath(path)
    if file_size(target) is None:
        return
    names = set(MANIFEST_SCHEMA.names)
    for batch in iter_parquet(target):
        for row in batch.to_pylist():
            yield ImageRecord(**{k: v for k, v in row.items() if k in names})


def read_manifest(path: Path | UPath) -> list[ImageRecord]:
    """The manifest's records, or an empty list when there is none (or it is unreadable)."""
    try:
        return list(iter_manifest(path))
    except (pa.ArrowException, OSError):
        return []  # a damaged manifest only costs a re-download


class ManifestIndex:
    """A manifest's records by (row_id, role, index), on disk (a `DiskIndex`).

    Memory does not grow with the manifest. A key listed twice keeps its last record, as a
    dict built from `read_manifest` would; with `ok_only`, only stored images are kept. A
    missing or damaged manifest gives an empty index.

    Example::

        with ManifestIndex(Path("data/output/flux2_images/cats.parquet"), ok_only=True) as found:
            found.get("row-1", "edited", 0)  # an ImageRecord, or None
    """

    def __init__(self, path: Path | UPath, *, ok_only: bool = False) -> None:
        self._index = DiskIndex()
        try:
            self._index.put_all(
                ((r.row_id, r.role, r.index), r.row())
                for r in iter_manifest(path)
                if r.ok or not ok_only
            )
        except (pa.ArrowException, OSError):
            self._index.clear()  # as read_manifest: a damaged manifest holds nothing
        except BaseException:
            self._index.close()
            raise

    def get(self, row_id: str, role: str, index: int) -> ImageRecord | None:
        """The record of image `index` of `role` of row `row_id`, or None."""
        found = self._index.get((row_id, role, index))
        return None if found is None else ImageRecord(**found)

    def close(self) -> None:
        """Delete the index."""
        self._index.close()

    def __enter__(self) -> ManifestIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ManifestWriter(ParquetStreamWriter):
    """Streams records into a manifest that appears at `path` only on `commit`.

    A `ParquetStreamWriter` of `MANIFEST_SCHEMA`: a reader never sees half a manifest, and
    an aborted write leaves the previous one as it was. As a context manager it commits
    when the block succeeds and aborts when it raises.

    Example::

        with ManifestWriter(Path("data/output/flux2_images/cats.parquet")) as manifest:
            manifest.write(ImageRecord("row-1", None, "edited", 0, "https://x/1.png", "ok"))
        manifest.rows_written  # 1
    """

    def __init__(self, path: Path | UPath) -> None:
        super().__init__(ensure_upath(path), MANIFEST_SCHEMA)

    def write(self, record: ImageRecord) -> None:
        """Append one record (after those written before it)."""
        self.write_row(record.row())


def write_manifest(path: Path | UPath, records: Iterable[ImageRecord]) -> None:
    """Write the manifest atomically (temporary file, then rename; one upload remotely)."""
    with ManifestWriter(path) as manifest:
        for record in records:
            manifest.write(record)
