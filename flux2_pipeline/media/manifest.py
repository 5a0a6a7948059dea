"""The image manifest: one row per image of every completed row of a partition.

An `ImageRef` is an image the results table points at (a reference image the row sent,
role `source`, or an output image, role `edited`); an `ImageRecord` is that reference
after the sync: stored (`status` "ok", with its sha256 and verified description) or
failed (`status` "failed", with the reason in `error`).

Example::

    refs = image_refs(pq.read_table("data/output/flux2_edits/cats.parquet"))
    write_manifest(Path("data/output/flux2_images/cats.parquet"), records)
    previous = read_manifest(Path("data/output/flux2_images/cats.parquet"))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from flux2_pipeline.paths import atomic_writer, ensure_upath, file_size, read_parquet

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
    ]
)
"""The manifest's schema (see CONTRACT.md, "Downstream datasets")."""

MANIFEST_COLUMN_DESCRIPTIONS: dict[str, str] = {
    "row_id": "the results row the image belongs to",
    "request_id": "the API job that produced the row",
    "role": "source (a reference image sent) or edited (an output image)",
    "index": "position in image_urls (source) or output_urls (edited)",
    "url": "where the image was fetched from",
    "sha256": "sha256 of the stored bytes; null if the image failed",
    "path": "the stored file, relative to FLUX2_OUTPUT_DIR",
    "width": "pixels, from decoding the stored bytes",
    "height": "pixels, from decoding the stored bytes",
    "format": "Pillow's format name (PNG, JPEG, WEBP)",
    "bytes": "size of the stored file",
    "status": "ok, or failed",
    "error": "why the image is missing, when failed",
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

    @property
    def ok(self) -> bool:
        """True when the image is stored and verified."""
        return self.status == "ok"

    def row(self) -> dict[str, Any]:
        """The record as a dict keyed by `MANIFEST_SCHEMA` names."""
        return asdict(self)


def image_refs(results: pa.Table) -> list[ImageRef]:
    """The images of every completed row, in row order: its sources, then its edits."""
    refs: list[ImageRef] = []
    columns = results.select(["row_id", "request_id", "status", "image_urls", "output_urls"])
    for row in columns.to_pylist():
        if row["status"] != "completed":
            continue
        for index, url in enumerate(row["image_urls"] or []):
            refs.append(ImageRef(row["row_id"], row["request_id"], "source", index, url))
        for index, url in enumerate(row["output_urls"] or []):
            refs.append(ImageRef(row["row_id"], row["request_id"], "edited", index, url))
    return refs


def read_manifest(path: Path | UPath) -> list[ImageRecord]:
    """The manifest's records, or an empty list when there is none (or it is unreadable)."""
    target = ensure_upath(path)
    if file_size(target) is None:
        return []
    try:
        table = read_parquet(target)
    except (pa.ArrowException, OSError):
        return []  # a damaged manifest only costs a re-download
    names = set(MANIFEST_SCHEMA.names)
    return [
        ImageRecord(**{k: v for k, v in row.items() if k in names}) for row in table.to_pylist()
    ]


def write_manifest(path: Path | UPath, records: Sequence[ImageRecord]) -> None:
    """Write the manifest atomically (temporary file, then rename; one upload remotely)."""
    table = pa.Table.from_pylist([record.row() for record in records], schema=MANIFEST_SCHEMA)
    with atomic_writer(ensure_upath(path)) as handle:
        pq.write_table(table, handle, compression="zstd")
