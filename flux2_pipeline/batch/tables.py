"""Input prompt tables in, results tables out: streamed, validated, written atomically.

`read_input_rows` streams a Parquet file in record batches and turns every row into
an `InputRow`: either a valid `EditRequest` or the reason it is invalid, naming the
column and the rule. Memory depends on the batch size, not the file size.

`ResultsWriter` streams `RowOutcome`s into `<key>.parquet` through a temporary file
that is renamed into place (or uploaded in one put, for an object store) on success, so a
crash never leaves a half file.

Example::

    for batch in read_input_rows(Path("data/prompts/cats.parquet")):
        for row in batch:
            print(row.row_id, row.request or row.invalid_reason)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args, get_origin

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from flux2_pipeline.batch.ids import RowIdRegistry
from flux2_pipeline.paths import (
    ParquetStreamWriter,
    ensure_upath,
    file_size,
    is_local,
    local_path,
    open_for_reading,
)
from flux2_pipeline.runcomfy import PARAMETER_NAMES, EditRequest, InvalidEditRequest

READ_BATCH_ROWS = 1024
READ_BUFFER_BYTES = 1 << 16
"""Read column chunks through a 64 KiB buffer, page by page, not whole.

Measured (pyarrow 26.0.1, 2026-11-24): one row group of 100k -> 400k rows (id, a random
80-character prompt, one URL), read with `iter_batches(batch_size=1024)`; Arrow pool peak
(`pa.total_allocated_bytes`) and process peak RSS over the imports, in MB:
  default (pre_buffer on)                     13.9 / 45  ->  38.0 / 73
  use_threads=False                           13.9 / 43  ->  38.0 / 73
  pre_buffer=False                            13.9 / 45  ->  38.0 / 71
  memory_map=True                              5.8 / 45  ->   5.8 / 64 (mapped pages in RSS)
  dataset scanner, no readahead, 1 MiB buf    13.3 / 60  ->  53.7 / 158
  pre_buffer=False, buffer_size=1 MiB          7.4 / 43  ->   7.8 / 45
  pre_buffer=False, buffer_size=64 KiB         5.9 / 39  ->   5.9 / 41   <- used
Without a buffer, pyarrow loads each column chunk (a whole row group's column) at once;
with `buffer_size` it streams the chunk and decodes page by page, so memory depends on
the batch and page size, not on the row group. No page-level code of our own is needed.
`use_threads=False` too: with the 64 KiB buffer, threaded decoding still took the peak RSS
from 153 to 175 MB between 20k and 200k rows, single-threaded from 139 to 151 (allocator
warm-up over the first ~40 batches, then flat).
"""
REQUIRED_COLUMNS = ("prompt", "image_urls")
KNOWN_COLUMNS = frozenset({"id", *REQUIRED_COLUMNS, *PARAMETER_NAMES})


class InputTableError(ValueError):
    """The whole table is unusable (unreadable, not Parquet, a required column missing)."""


@dataclass(frozen=True, slots=True)
class InputRow:
    """One input row: a valid request, or the reason it is invalid (never both)."""

    position: int
    row_id: str
    prompt: str | None
    image_urls: tuple[str, ...]
    request: EditRequest | None = None
    invalid_reason: str | None = None
    warning: str | None = None
    fingerprint: str | None = None
    """sha256 of the request as written in the table (s3:// URIs, not their signed URLs)."""


_ARROW_SCALARS: tuple[tuple[type, pa.DataType], ...] = (
    (bool, pa.bool_()),
    (int, pa.int64()),
    (float, pa.float64()),
    (str, pa.string()),
)


def parameter_arrow_type(name: str) -> pa.DataType:
    """The Arrow type of an edit parameter's column, read off its `EditRequest` field.

    >>> parameter_arrow_type("seed"), parameter_arrow_type("image_size")
    (DataType(int64), DataType(string))
    """
    annotation = EditRequest.model_fields[name].annotation
    if get_origin(annotation) is Literal and all(isinstance(c, str) for c in get_args(annotation)):
        return pa.string()
    for python_type, arrow in _ARROW_SCALARS:
        if annotation is python_type:
            return arrow
    raise TypeError(f"EditRequest.{name}: no results column type for {annotation!r}")


RESULTS_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("image_urls", pa.list_(pa.string())),
        *(pa.field(name, parameter_arrow_type(name)) for name in PARAMETER_NAMES),
        pa.field("request_id", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("output_urls", pa.list_(pa.string()), nullable=False),
        pa.field("error", pa.string()),
        pa.field("attempts", pa.int64(), nullable=False),
        pa.field("submitted_at", pa.timestamp("us", tz="UTC")),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("cost_usd", pa.float64()),
        pa.field("warning", pa.string()),
    ]
)
"""The results dataset's schema (docs/data.md); `cost_usd` and `warning` are extras."""

RESULT_COLUMN_DESCRIPTIONS: dict[str, str] = {
    "row_id": "the input id, or one derived from the row's content",
    "prompt": "the edit instruction as sent",
    "image_urls": "reference image URLs as sent (at most 3)",
    **{
        name: f"effective {name} (the row's value, else the configured default)"
        for name in PARAMETER_NAMES
    },
    "request_id": "the API's id of the job that produced this row",
    "status": "completed, failed, invalid or cancelled",
    "output_urls": "result image URLs, empty unless completed",
    "error": "why the row is not completed",
    "attempts": "paid submissions made for this row",
    "submitted_at": "when the job that produced this row was submitted (UTC)",
    "finished_at": "when that job reached a terminal state (UTC)",
    "cost_usd": "what the API reported the job cost",
    "warning": "a note about the input, e.g. image_urls cut to 3",
}


def read_input_rows(
    path: Path | UPath,
    batch_rows: int = READ_BATCH_ROWS,
    defaults: Mapping[str, Any] | None = None,
    sign_url: Callable[[str], str] | None = None,
) -> Iterator[list[InputRow]]:
    """Stream a prompt table (a local file or an object) as batches of validated `InputRow`s.

    `defaults` fills parameters a row leaves null (the API schema's defaults apply
    after that). `sign_url` turns `s3://` reference URIs into URLs the API can fetch;
    the results keep the original URIs.
    Raises `InputTableError` (one clear line) when the file is not readable Parquet
    or lacks a required column. Given and derived ids share one namespace: a later row
    whose given id is taken is invalid; one without an id whose derived id is taken gets
    the next numbered derived id (see `flux2_pipeline.batch.ids`).
    """
    with opened_parquet(path) as parquet:
        yield from _validated_rows(parquet, path.name, batch_rows, defaults, sign_url)


def _validated_rows(
    parquet: pq.ParquetFile,
    name: str,
    batch_rows: int,
    defaults: Mapping[str, Any] | None,
    sign_url: Callable[[str], str] | None,
) -> Iterator[list[InputRow]]:
    columns = set(parquet.schema_arrow.names)
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise InputTableError(
            f"{name}: missing required column(s) {', '.join(missing)} "
            f"(found: {', '.join(sorted(columns)) or 'none'})"
        )
    wanted = [column for column in parquet.schema_arrow.names if column in KNOWN_COLUMNS]
    position = 0
    with RowIdRegistry(KNOWN_COLUMNS) as ids:
        try:
            batches = parquet.iter_batches(batch_size=batch_rows, columns=wanted, use_threads=False)
            for record_batch in batches:
                records = record_batch.to_pylist()
                rows = []
                for record, assigned in zip(records, ids.assign_batch(records), strict=True):
                    rows.append(_input_row(position, record, assigned, defaults or {}, sign_url))
                    position += 1
                yield rows
        except (pa.ArrowException, OSError) as exc:
            raise InputTableError(f"{name}: unreadable after row {position}: {exc}") from exc


@contextmanager
def opened_parquet(path: Path | UPath) -> Iterator[pq.ParquetFile]:
    """A Parquet file (local or in an object store) open for streaming, closed on exit;
    every way it can be broken becomes `InputTableError`.

    Example::

        with opened_parquet(as_path("s3://bucket/prompts/cats.parquet")) as parquet:
            print(parquet.metadata.num_rows)
    """
    target = ensure_upath(path)
    try:
        size = file_size(target)
        if size is None:
            raise FileNotFoundError(target.name)
        if size == 0:
            raise InputTableError(f"{path.name}: the file is empty (0 bytes), not a Parquet table")
        # Locally pyarrow reads the file itself (no Python in its read path); a store's
        # object is read through fsspec in ranges of bounded size.
        handle = None if is_local(target) else open_for_reading(target)
    except FileNotFoundError as exc:
        raise InputTableError(f"{path.name}: no such input file") from exc
    except OSError as exc:
        raise InputTableError(f"{path.name}: cannot be opened ({exc})") from exc
    try:
        source = local_path(target) if handle is None else handle
        try:
            parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
        except (pa.ArrowException, OSError) as exc:
            raise InputTableError(f"{path.name}: not a readable Parquet file ({exc})") from exc
        try:
            yield parquet
        finally:
            parquet.close()
    finally:
        if handle is not None:
            handle.close()


LARGE_ROW_GROUP_ROWS = 100_000
"""A row group this large was once read whole; it is now streamed (`READ_BUFFER_BYTES`)."""


class InputShape(NamedTuple):
    """A Parquet file's row count and its largest row group, from the footer alone."""

    rows: int
    largest_row_group: int
    """Informational: rows are streamed page by page (`READ_BUFFER_BYTES`), so even one
    huge row group is read in bounded memory."""


def input_shape(path: Path | UPath) -> InputShape:
    """Read the footer once: how many rows, and how big the largest row group is.

    Example::

        shape = input_shape(Path("data/prompts/cats.parquet"))
        print(shape.rows, shape.largest_row_group)
    """
    with opened_parquet(path) as parquet:
        metadata = parquet.metadata
    groups = (metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return InputShape(int(metadata.num_rows), max(groups, default=0))


def _input_row(
    position: int,
    record: dict[str, Any],
    assigned: tuple[str, str | None],
    defaults: Mapping[str, Any],
    sign_url: Callable[[str], str] | None = None,
) -> InputRow:
    prompt = record.get("prompt")
    urls = record.get("image_urls")
    shown_urls = _as_url_tuple(urls)
    shown_prompt = prompt if isinstance(prompt, str) else None
    row_id, id_problem = assigned
    if id_problem:
        return InputRow(position, row_id, shown_prompt, shown_urls, invalid_reason=id_problem)
    try:
        signed = _signed_urls(urls, sign_url)
    except UrlSigningError as exc:
        return InputRow(position, row_id, shown_prompt, shown_urls, invalid_reason=str(exc))
    data = {"prompt": prompt, "image_urls": urls if signed is None else signed}
    for name in PARAMETER_NAMES:
        value = record.get(name)
        data[name] = defaults.get(name) if value is None else value
    try:
        request = EditRequest.parse(data)
    except InvalidEditRequest as exc:
        reason = "; ".join(str(issue) for issue in exc.issues)
        return InputRow(position, row_id, shown_prompt, shown_urls, invalid_reason=reason)
    warning = "; ".join(request.warnings) or None
    # The row as written (s3:// URIs, not their signed URLs) is what the ledger keys on.
    as_written = (
        request
        if signed is None
        else request.model_copy(update={"image_urls": shown_urls[: len(request.image_urls)]})
    )
    return InputRow(
        position,
        row_id,
        request.prompt,
        as_written.image_urls,
        request=request,
        warning=warning,
        fingerprint=as_written.fingerprint(),
    )


class UrlSigningError(ValueError):
    """A row's `s3://` reference cannot be pre-signed; the message is its invalid reason."""


def _signed_urls(urls: Any, sign_url: Callable[[str], str] | None) -> list[Any] | None:
    """`urls` as a list with every s3:// URI signed, or None when nothing needs signing.

    Raises `UrlSigningError` (naming the column) when a URI cannot be signed.
    """
    items = [urls] if isinstance(urls, str) else urls
    if not isinstance(items, list | tuple) or not any(
        isinstance(u, str) and u.startswith("s3://") for u in items
    ):
        return None
    if sign_url is None:
        raise UrlSigningError(
            "image_urls: s3:// URIs need the s3 extra (pip install 'flux2-pipeline[s3]')"
        )
    signed = []
    for url in items:
        if isinstance(url, str) and url.startswith("s3://"):
            try:
                url = sign_url(url)
            except Exception as exc:  # any signer failure is this row's problem only
                raise UrlSigningError(f"image_urls: cannot pre-sign {url}: {exc}") from None
        signed.append(url)
    return signed


def _as_url_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(str(item) for item in value if item is not None)
    return ()


class RowStatus(StrEnum):
    """A results row's `status` (docs/data.md); a `str`, so it is stored as its value."""

    COMPLETED = "completed"
    """The job finished with at least one image URL."""
    FAILED = "failed"
    """Not completed: the job failed, was never sent, or its outcome is unknown (see error)."""
    INVALID = "invalid"
    """The row breaks the input schema; never sent."""
    CANCELLED = "cancelled"
    """The job was cancelled (a stopped run, a deadline)."""


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """One results-table row (see `RESULTS_SCHEMA`)."""

    row: InputRow
    status: RowStatus
    request_id: str | None = None
    output_urls: tuple[str, ...] = ()
    error: str | None = None
    attempts: int = 0
    submitted_at: datetime | None = None
    finished_at: datetime | None = None
    cost_usd: float | None = None
    unknown_resubmitted: bool = False

    def record(self) -> dict[str, Any]:
        """The row as a dict keyed by `RESULTS_SCHEMA` names."""
        request = self.row.request
        params: dict[str, Any] = (
            {name: getattr(request, name) for name in PARAMETER_NAMES}
            if request is not None
            else dict.fromkeys(PARAMETER_NAMES)
        )
        return {
            "row_id": self.row.row_id,
            "prompt": self.row.prompt,
            "image_urls": list(self.row.image_urls),
            **params,
            "request_id": self.request_id,
            "status": self.status,
            "output_urls": list(self.output_urls),
            "error": self.error,
            "attempts": self.attempts,
            "submitted_at": self.submitted_at,
            "finished_at": self.finished_at,
            "cost_usd": self.cost_usd,
            "warning": self.row.warning,
        }


RESULTS_ROW_GROUP_ROWS = 16_384
"""Rows per results row group. The writer keeps every row group's metadata until the
footer is written: with 1,024-row groups its peak RSS grew from 180 to 191 MB between
100k and 400k rows; with 16Ki-row groups from 191 to 195 MB (the rows held as Arrow
until a group is written), measured 2026-11-24 on invalid rows, reader and writer alone."""


class ResultsWriter(ParquetStreamWriter):
    """Streams results into a Parquet file that appears only when complete.

    A `ParquetStreamWriter` of `RESULTS_SCHEMA`: the bytes go to an `AtomicFile` (a local
    temporary file, renamed or uploaded in one put on commit), so readers never see a
    half-written file.

    Example::

        with ResultsWriter(Path("out/flux2_edits/cats.parquet")) as writer:
            writer.write(outcomes)
        # out/flux2_edits/cats.parquet now exists; on an exception it does not change.
    """

    def __init__(
        self,
        path: Path | UPath,
        flush_rows: int = READ_BATCH_ROWS,
        row_group_rows: int = RESULTS_ROW_GROUP_ROWS,
    ) -> None:
        super().__init__(ensure_upath(path), RESULTS_SCHEMA, flush_rows, row_group_rows)

    def write(self, outcomes: Sequence[RowOutcome]) -> None:
        """Buffer outcomes; turn them into Arrow every `flush_rows` rows, and write a row
        group every `row_group_rows` rows."""
        for outcome in outcomes:
            self.write_row(outcome.record())


def file_sha256(path: Path | UPath, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's bytes (local or in an object store), in chunks."""
    digest = hashlib.sha256()
    with open_for_reading(ensure_upath(path)) as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
