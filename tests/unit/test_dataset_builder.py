"""The training-dataset builder on real Parquet in tmp_path: shards, incremental rebuilds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flux2_pipeline.dataset import (
    DATASET_SCHEMA,
    FEATURES,
    build_training_dataset,
)
from flux2_pipeline.media import ImageRecord, ImageStore, write_manifest
from tests.helpers.datasets import partition_source, shaded_png


def test_features_match_what_datasets_builds() -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features.from_dict(FEATURES)
    assert features.to_dict() == FEATURES
    assert features.arrow_schema.remove_metadata().equals(DATASET_SCHEMA.remove_metadata())
    assert features["source_images"] == datasets.List(datasets.Image())


def test_shards_are_bounded_and_rebuilds_touch_only_changed_partitions(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", base=tmp_path)
    out = tmp_path / "dataset"
    sources = [
        partition_source(tmp_path, store, "test-set", 3),  # a split keyword in the name
        partition_source(tmp_path, store, "alpha", 5, images=2),
    ]
    first = build_training_dataset(sources, store, out, max_rows=4)
    assert (first.rows, first.rebuilt) == (3 + 10, ["alpha", "test-set"])
    shards = sorted(p.name for p in (out / "train").iterdir())
    assert shards == [
        "alpha-00000.parquet",
        "alpha-00001.parquet",
        "alpha-00002.parquet",
        "test-set-00000.parquet",
    ]
    table = pq.read_table(out / "train" / "alpha-00000.parquet")
    assert table.num_rows == 4 and table.schema.metadata == DATASET_SCHEMA.metadata
    first_row = table.slice(0, 1).to_pylist()[0]
    assert (first_row["row_id"], first_row["image_index"]) == ("alpha-0", 0)
    data = first_row["edited_image"]["bytes"]
    assert hashlib.sha256(data).hexdigest() == first_row["edited_sha256"]
    mtime = (out / "train" / "test-set-00000.parquet").stat().st_mtime_ns

    assert build_training_dataset(sources, store, out, max_rows=4).rebuilt == []
    sources[1] = partition_source(tmp_path, store, "alpha", 2)
    second = build_training_dataset(sources, store, out, max_rows=4)
    assert (second.rebuilt, second.rows) == (["alpha"], 3 + 2)
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "alpha-00000.parquet",
        "test-set-00000.parquet",
    ]
    assert (out / "train" / "test-set-00000.parquet").stat().st_mtime_ns == mtime

    third = build_training_dataset(sources[1:], store, out, max_rows=4)
    assert third.removed == ["test-set"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["alpha-00000.parquet"]

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(
        "parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert [row["row_id"] for row in ds] == ["alpha-0", "alpha-1"]
    assert ds[0]["edited_image"].size == (16, 8)


def test_rows_with_a_missing_image_are_left_out_and_counted(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", base=tmp_path)
    source = partition_source(tmp_path, store, "gappy", 3, images=2)
    records = pq.read_table(source.manifest_path).to_pylist()
    for record in records:
        if (record["row_id"], record["role"]) == ("gappy-1", "source"):
            record.update(status="failed", sha256=None, path=None, error="unavailable: HTTP 404")
        if (record["row_id"], record["role"], record["index"]) == ("gappy-2", "edited", 1):
            record.update(status="failed", sha256=None, path=None, error="corrupt: bad")
    write_manifest(source.manifest_path, [ImageRecord(**r) for r in records])
    report = build_training_dataset([source], store, tmp_path / "ds")
    assert (report.rows, report.skipped) == (3, 3)


def test_row_groups_are_bounded_by_image_bytes_as_well_as_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows embedding camera photos are held until their row group is written: a group
    # closes at ROW_GROUP_BYTES of images, long before ROW_GROUP_ROWS such rows.
    from flux2_pipeline.dataset import builder

    store = ImageStore(tmp_path / "images", base=tmp_path)
    source = partition_source(tmp_path, store, "photos", 10)
    row_bytes = builder._row_bytes(
        {
            "input_image": {"bytes": shaded_png(0)},
            "source_images": [{"bytes": shaded_png(0)}],
            "edited_image": {"bytes": shaded_png(100)},
        }
    )
    monkeypatch.setattr(builder, "ROW_GROUP_BYTES", 3 * row_bytes)
    report = build_training_dataset([source], store, tmp_path / "dataset")
    shard = pq.ParquetFile(tmp_path / "dataset" / "train" / "photos-00000.parquet")
    groups = [shard.metadata.row_group(i).num_rows for i in range(shard.metadata.num_row_groups)]
    assert report.rows == 10 and sum(groups) == 10
    assert max(groups) <= 3 and len(groups) >= 4, groups
