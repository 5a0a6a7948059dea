"""Build the sharded training dataset from every partition's results and image manifest.

Layout under `out_dir` (the `data_dir` of `datasets.load_dataset("parquet", ...)`)::

    train/<partition>-00000.parquet     shards of one partition, in row order
    train/<partition>-00001.parquet     (a new shard every `max_rows` rows or `max_bytes`)
    README.md                           the dataset card (see `flux2_pipeline.dataset.card`)
    .flux2_state.json                   per partition: input fingerprint, shards, counts

Shards live in a `train/` folder because `datasets` infers splits from file names: a
partition called `test-set` or `dev` would otherwise become a split of its own. Hidden
files (the state file, temporary shards) are ignored by `datasets`.

One row per edited image of every completed row whose references and that image are
stored. Row order is the shard file order (partition key, then shard number) and, inside
a shard, the results table's row order, then image index.

Incremental: a partition is rewritten only when its fingerprint (sha256 of its results
file and its image manifest, plus the builder version and shard limits) differs from the
one in the state file, or one of its shards is gone. Shards of partitions no longer given
are deleted. Each partition's new shards are written to hidden temporary files and renamed
into place; then the card is rewritten (when its text changed) and the state file is written
last, so an interrupted build is redone next time.
One build at a time per folder (the Dagster asset is one step).

`out_dir` may be in an object store (a `UPath` such as `s3://bucket/prefix/...`): shards
are staged locally and uploaded in one put each when the partition commits, and the state
file is uploaded last, so the same guarantees hold.

Example::

    report = build_training_dataset(
        [PartitionSource("cats", results_path, manifest_path)],
        store,
        Path("data/output/flux2_training_dataset"),
    )
    report.rows, report.shards, [p.key for p in report.partitions if p.rebuilt]
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock
from upath import UPath

from flux2_pipeline.batch.tables import file_sha256
from flux2_pipeline.dataset.card import render_card
from flux2_pipeline.dataset.features import DATASET_SCHEMA
from flux2_pipeline.dataset.report import (
    SPLIT_DIR,
    BuildReport,
    PartitionBuild,
    read_state,
    write_state,
)
from flux2_pipeline.dataset.webdataset import export_webdataset
from flux2_pipeline.media.manifest import ImageRecord, ManifestIndex, completed_rows
from flux2_pipeline.media.store import ImageStore
from flux2_pipeline.paths import (
    AtomicFile,
    ensure_upath,
    file_size,
    is_local,
    iter_parquet,
    local_path,
    make_dirs,
    write_bytes_atomically,
)
from flux2_pipeline.runcomfy import PARAMETER_NAMES

BUILDER_VERSION = 2
STATE_FILE = ".flux2_state.json"
MAX_SHARD_ROWS = 1000
MAX_SHARD_BYTES = 256 * 1024 * 1024
ROW_GROUP_ROWS = 64
ROW_GROUP_BYTES = 16 * 1024 * 1024
"""A row group is written once it holds this many image bytes, even short of
`ROW_GROUP_ROWS`: rows are held until written, as Python objects, then as Arrow (the
reference twice: `input_image` and `source_images`) and compressed, about 4x their image
bytes at peak. 48 rows of 3.3 MB photos took the step from 195 to 982 MB at 64 rows a group,
to 468 MB at 64 MB a group and to 309 MB at 16 MB."""
RESULTS_COLUMNS = ("row_id", "request_id", "prompt", "image_urls", "output_urls", "status")


@dataclass(frozen=True, slots=True)
class PartitionSource:
    """One partition's inputs: its flux2_edits results file and its image manifest."""

    key: str
    results_path: Path | UPath
    manifest_path: Path | UPath


def fingerprint(source: PartitionSource, max_rows: int, max_bytes: int) -> str:
    """What a partition's shards are made from; equal fingerprints mean equal shards."""
    parts = [
        f"v{BUILDER_VERSION}:{max_rows}:{max_bytes}:{ROW_GROUP_ROWS}",
        file_sha256(source.results_path),
        file_sha256(source.manifest_path),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _counts_from_state(raw: Any) -> dict[str, dict[str, int]]:
    if not isinstance(raw, dict):
        return {}
    return {
        str(name): {str(label): int(count) for label, count in counts.items()}
        for name, counts in raw.items()
        if isinstance(counts, dict)
    }


def _save_state(out_dir: UPath, builds: Sequence[PartitionBuild]) -> None:
    state = {
        "version": BUILDER_VERSION,
        "partitions": {
            b.key: {k: v for k, v in asdict(b).items() if k not in ("key", "rebuilt")}
            for b in builds
        },
    }
    write_state(out_dir / STATE_FILE, state)


def _examples(
    source: PartitionSource, store: ImageStore, counts: dict[str, int]
) -> Iterator[dict[str, Any]]:
    """The dataset rows of one partition, in order; counts skipped edited images.

    The results are streamed and the manifest is looked up on disk, so memory does not
    grow with the partition's rows.
    """
    columns = [*RESULTS_COLUMNS, *PARAMETER_NAMES]
    rows = completed_rows(iter_parquet(ensure_upath(source.results_path), columns), columns)
    with ManifestIndex(source.manifest_path, ok_only=True) as images:
        yield from _examples_of(source, rows, images, store, counts)


def _examples_of(
    source: PartitionSource,
    rows: Iterator[dict[str, Any]],
    images: ManifestIndex,
    store: ImageStore,
    counts: dict[str, int],
) -> Iterator[dict[str, Any]]:
    for row in rows:
        outputs = row["output_urls"] or []
        sources = [images.get(row["row_id"], "source", i) for i in range(len(row["image_urls"]))]
        if any(s is None for s in sources):
            counts["skipped"] += len(outputs)
            continue
        source_images = [_image_cell(store, s) for s in sources if s is not None]
        source_shas = [s.sha256 for s in sources if s is not None]
        if not source_images:
            counts["skipped"] += len(outputs)
            continue
        for index in range(len(outputs)):
            edited = images.get(row["row_id"], "edited", index)
            if edited is None:
                counts["skipped"] += 1
                continue
            yield {
                "input_image": source_images[0],
                "edit_prompt": row["prompt"],
                "edited_image": _image_cell(store, edited),
                "prompt": row["prompt"],
                "source_images": source_images,
                "num_source_images": len(source_images),
                **{name: row[name] for name in PARAMETER_NAMES},
                "partition": source.key,
                "row_id": row["row_id"],
                "request_id": row["request_id"],
                "image_index": index,
                "edited_sha256": edited.sha256,
                "source_sha256s": source_shas,
                "width": edited.width,
                "height": edited.height,
            }


def _image_cell(store: ImageStore, record: ImageRecord) -> dict[str, Any]:
    assert record.path is not None
    return {"bytes": store.read(record.path), "path": PurePosixPath(record.path).name}


def _row_bytes(example: dict[str, Any]) -> int:
    images = [example["input_image"], example["edited_image"], *example["source_images"]]
    return sum(len(cell["bytes"]) for cell in images)


class _ShardWriter:
    """Writes one partition's shards to hidden temporary files; `commit` moves them in.

    Each shard streams into an `AtomicFile` (a temporary file next to the shard, or a
    local staging file for an object store) held open until `commit` renames or uploads
    them all; `abort` drops them.
    """

    def __init__(self, folder: UPath, key: str, max_rows: int, max_bytes: int) -> None:
        self.folder, self.key = folder, key
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.names: list[str] = []
        self._targets: list[AtomicFile] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = self._bytes = self._pending_bytes = 0
        self._pending: list[dict[str, Any]] = []
        self.total_rows = self.arrow_bytes = 0

    def add(self, example: dict[str, Any]) -> None:
        size = _row_bytes(example)
        if self._writer is None or (
            self._rows >= self.max_rows or (self._rows and self._bytes + size > self.max_bytes)
        ):
            self._open_next()
        self._pending.append(example)
        self._rows += 1
        self._bytes += size
        self._pending_bytes += size
        self.total_rows += 1
        if len(self._pending) >= ROW_GROUP_ROWS or self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending and self._writer is not None:
            table = pa.Table.from_pylist(self._pending, schema=DATASET_SCHEMA)
            self._writer.write_table(table)
            self.arrow_bytes += table.nbytes
            self._pending, self._pending_bytes = [], 0

    def _open_next(self) -> None:
        self._close()
        name = f"{self.key}-{len(self.names):05d}.parquet"
        target = AtomicFile(self.folder / name)
        self._targets.append(target)
        self.names.append(name)
        self._writer = pq.ParquetWriter(target.handle, DATASET_SCHEMA, compression="zstd")
        self._rows = self._bytes = 0

    def _close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def commit(self) -> list[str]:
        try:
            self._close()
            for target in self._targets:
                target.commit()
        except BaseException:
            self.abort()
            raise
        return self.names

    def abort(self) -> None:
        try:
            self._close()
        finally:
            for target in self._targets:
                target.abort()


def _children(folder: UPath) -> list[UPath]:
    """The entries of `folder`; none when an object-store prefix holds nothing yet."""
    try:
        return [path for path in folder.iterdir() if path.name]
    except FileNotFoundError:
        return []


def _build_partition(
    source: PartitionSource,
    store: ImageStore,
    folder: UPath,
    old_shards: Sequence[str],
    digest: str,
    max_rows: int,
    max_bytes: int,
) -> PartitionBuild:
    counts = {"skipped": 0}
    build = PartitionBuild(key=source.key, fingerprint=digest, rebuilt=True)
    writer = _ShardWriter(folder, source.key, max_rows, max_bytes)
    try:
        for example in _examples(source, store, counts):
            writer.add(example)
            build.count_values(example)
        names = writer.commit()
    except BaseException:
        writer.abort()
        raise
    for stale in set(old_shards) - set(names):
        (folder / stale).unlink(missing_ok=True)
    build.shards, build.rows, build.skipped = names, writer.total_rows, counts["skipped"]
    build.bytes = sum(file_size(folder / name) or 0 for name in names)
    build.arrow_bytes = writer.arrow_bytes
    return build


def _outside(root: UPath, candidate: UPath) -> UPath:
    inner, outer = str(candidate).rstrip("/") + "/", str(root).rstrip("/") + "/"
    if inner.startswith(outer) or outer.startswith(inner):
        raise ValueError(
            f"webdataset_dir must be outside the Parquet dataset folder {root} "
            f"(datasets would read its tar files as data files), got {candidate}"
        )
    return candidate


def _write_card(report: BuildReport, input_dir: str | None) -> None:
    text = render_card(report, input_dir=input_dir)
    try:
        unchanged = report.card_path.read_text() == text
    except (OSError, UnicodeDecodeError):
        unchanged = False
    if not unchanged:
        write_bytes_atomically(report.card_path, text.encode())


def build_training_dataset(
    sources: Sequence[PartitionSource],
    store: ImageStore,
    out_dir: Path | UPath,
    *,
    max_rows: int = MAX_SHARD_ROWS,
    max_bytes: int = MAX_SHARD_BYTES,
    input_dir: str | None = None,
    webdataset_dir: Path | UPath | None = None,
) -> BuildReport:
    """Bring `out_dir` up to date with `sources`, rewriting only partitions that changed.

    The dataset card (`README.md`) is rewritten whenever its text changes; `input_dir`,
    where the partitions' input files live, is named in it. With `webdataset_dir` (outside
    `out_dir`), the same rows are also kept as WebDataset tar shards there (see
    `flux2_pipeline.dataset.webdataset`; needs the `webdataset` extra).
    """
    if max_rows < 1 or max_bytes < 1:
        raise ValueError("max_rows and max_bytes must be at least 1")
    root = ensure_upath(out_dir)
    # Two runs finishing at once (a sensor run beside a backfill, two terminals) would
    # otherwise rewrite the same shards and state file from under each other.
    with _build_lock(root):
        return _build(sources, store, root, max_rows, max_bytes, input_dir, webdataset_dir)


BUILD_LOCK_TIMEOUT = 3600.0
"""Seconds a build waits for another process's build of the same dataset."""


def _build_lock(root: UPath) -> FileLock:
    """A lock file beside a local dataset; for an object store, one per URI on this machine."""
    if is_local(root):
        folder = local_path(root).parent
        folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(folder / f".{root.name}.lock"), timeout=BUILD_LOCK_TIMEOUT)
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    locks = Path(tempfile.gettempdir()) / "flux2-pipeline-locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"dataset-{digest}.lock"), timeout=BUILD_LOCK_TIMEOUT)


def _build(
    sources: Sequence[PartitionSource],
    store: ImageStore,
    root: UPath,
    max_rows: int,
    max_bytes: int,
    input_dir: str | None,
    webdataset_dir: Path | UPath | None,
) -> BuildReport:
    tar_dir = None if webdataset_dir is None else _outside(root, ensure_upath(webdataset_dir))
    folder = root / SPLIT_DIR
    make_dirs(folder)
    state = read_state(root / STATE_FILE, "partitions")
    report = BuildReport(root)
    for source in sorted(sources, key=lambda s: s.key):
        digest = fingerprint(source, max_rows, max_bytes)
        known = state.get(source.key, {})
        old_shards = [str(name) for name in known.get("shards", [])]
        intact = all(file_size(folder / name) is not None for name in old_shards)
        if known.get("fingerprint") == digest and intact:
            report.partitions.append(
                PartitionBuild(
                    key=source.key,
                    fingerprint=digest,
                    shards=old_shards,
                    rows=int(known.get("rows", 0)),
                    bytes=int(known.get("bytes", 0)),
                    arrow_bytes=int(known.get("arrow_bytes", 0)),
                    skipped=int(known.get("skipped", 0)),
                    value_counts=_counts_from_state(known.get("value_counts")),
                )
            )
            continue
        report.partitions.append(
            _build_partition(source, store, folder, old_shards, digest, max_rows, max_bytes)
        )
    report.removed = sorted(set(state) - {s.key for s in sources})
    keep = {name for build in report.partitions for name in build.shards}
    for path in _children(folder):
        if path.name not in keep and (path.suffix in (".parquet", ".tmp")):
            path.unlink(missing_ok=True)  # shards of removed partitions, leftovers of crashes
    if tar_dir is not None:
        report.webdataset = export_webdataset(report.partitions, folder, tar_dir)
    _write_card(report, input_dir)
    _save_state(root, report.partitions)
    return report
