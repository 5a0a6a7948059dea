"""Results and manifests read in record batches give what the whole tables gave."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flux2_pipeline.media import (
    ImageRecord,
    ImageStore,
    ManifestIndex,
    contact_rows,
    image_refs,
    read_manifest,
    write_manifest,
)
from flux2_pipeline.paths import as_path, iter_parquet


def write_results(path: Path, rows: int) -> None:
    """Every third row failed; the others completed with two references and one edit."""
    table = pa.table(
        {
            "row_id": [f"row-{i}" for i in range(rows)],
            "request_id": [f"req-{i}" if i % 5 else None for i in range(rows)],
            "prompt": [f"prompt {i}" for i in range(rows)],
            "status": ["failed" if i % 3 == 0 else "completed" for i in range(rows)],
            "image_urls": [
                [f"https://ref.test/{i}/a.png", "https://ref.test/b.png"] for i in range(rows)
            ],
            "output_urls": [
                [] if i % 3 == 0 else [f"https://out.test/{i}.png"] for i in range(rows)
            ],
        }
    )
    pq.write_table(table, path, row_group_size=4)


def test_refs_and_contact_rows_from_batches_equal_those_from_the_table(tmp_path: Path) -> None:
    path = tmp_path / "results.parquet"
    write_results(path, 20)
    store = ImageStore(tmp_path / "images", base=tmp_path)
    # A manifest as the sync writes it: the completed rows' images, in row order; every
    # image of row-1 failed.
    records = [
        ImageRecord(f"row-{i}", None, role, index, "u", "ok", path=f"images/{i}-{role}{index}.png")
        if i != 1
        else ImageRecord(f"row-{i}", None, role, index, "u", "failed", error="gone")
        for i in range(20)
        if i % 3
        for role, index in (("source", 0), ("source", 1), ("edited", 0))
    ]
    whole = pq.read_table(path)

    assert image_refs(iter_parquet(as_path(path), batch_rows=3)) == image_refs(whole)
    assert len(image_refs(whole)) == 13 * 3  # 13 completed rows: two sources, one edit
    read: list[int] = []

    def counted() -> Iterator[pa.RecordBatch]:
        for batch in iter_parquet(as_path(path), batch_rows=2):
            read.append(batch.num_rows)
            yield batch

    taken: list[ImageRecord] = []

    def counted_records() -> Iterator[ImageRecord]:
        for record in records:
            taken.append(record)
            yield record

    sheet = contact_rows(counted(), counted_records(), store, limit=3)
    assert sheet == contact_rows(whole, records, store, limit=3)
    assert [row.row_id for row in sheet] == ["row-2", "row-4", "row-5"]
    assert sheet[0].sources == (
        store.resolve("images/2-source0.png"),
        store.resolve("images/2-source1.png"),
    )
    assert sheet[0].edits == (store.resolve("images/2-edited0.png"),)
    assert read == [2, 2, 2]  # stopped at the third completed row, not at the end
    # The manifest too: rows 1, 2, 4 and 5, and the first record of row 7 that ends row 5.
    assert len(taken) == 4 * 3 + 1


def test_the_manifest_index_answers_as_a_dict_of_the_records_would(tmp_path: Path) -> None:
    stored = ImageRecord("r", None, "edited", 0, "https://out.test/1", "ok", sha256="aa")
    failed_later = ImageRecord("r", None, "edited", 0, "https://out.test/2", "failed", error="x")
    source = ImageRecord("r", "req", "source", 1, "https://ref.test/1", "ok", width=3)
    path = tmp_path / "manifest.parquet"
    records = [stored, failed_later, source]
    write_manifest(path, records)

    by_key = {(r.row_id, r.role, r.index): r for r in records}
    ok_by_key = {(r.row_id, r.role, r.index): r for r in records if r.ok}
    with ManifestIndex(path) as every, ManifestIndex(path, ok_only=True) as ok:
        for key in [*by_key, ("r", "edited", 1), ("s", "source", 1)]:
            assert every.get(*key) == by_key.get(key)
            assert ok.get(*key) == ok_by_key.get(key)
        assert every.get("r", "edited", 0) == failed_later and ok.get("r", "edited", 0) == stored

    path.write_bytes(b"PAR1 not a parquet file PAR1")
    with ManifestIndex(path) as damaged, ManifestIndex(tmp_path / "none.parquet") as missing:
        assert damaged.get("r", "source", 1) is None and missing.get("r", "source", 1) is None
    assert read_manifest(path) == []
