"""The WebDataset export: the same rows as the Parquet shards, kept up to date incrementally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from flux2_pipeline.dataset import build_training_dataset
from flux2_pipeline.media import ImageStore
from tests.helpers.datasets import partition_source

wds = pytest.importorskip("webdataset")


def _samples(paths: list[Path]) -> list[dict[str, Any]]:
    """Every sample of the tars, parsed by webdataset's own tar reader and key grouping.

    `wds.WebDataset(urls)` leaves the last tar's file for the garbage collector, which
    warnings-as-errors turns into a failure, so the files are opened (and closed) here.
    """
    samples: list[dict[str, Any]] = []
    for path in paths:
        with path.open("rb") as handle:
            files = wds.tariterators.tar_file_expander([{"url": str(path), "stream": handle}])
            samples.extend(wds.tariterators.group_by_keys(files))
    return samples


def test_tar_shards_hold_the_parquet_rows_and_follow_the_partitions(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", base=tmp_path)
    out, tars = tmp_path / "ds", tmp_path / "ds_wds"
    sources = [
        partition_source(tmp_path, store, "alpha", 5, images=2, references=2),
        partition_source(tmp_path, store, "b.eta", 2),
    ]
    report = build_training_dataset(sources, store, out, max_rows=4, webdataset_dir=tars)
    assert report.webdataset is not None
    assert report.webdataset.tars == [
        "alpha-00000.tar",
        "alpha-00001.tar",
        "alpha-00002.tar",
        "b.eta-00000.tar",
    ]
    assert sorted(p.name for p in tars.glob("*.tar")) == sorted(report.webdataset.tars)

    rows = [
        row
        for shard in sorted((out / "train").glob("*.parquet"))
        for row in pq.read_table(shard).to_pylist()
    ]
    samples = _samples([tars / name for name in report.webdataset.tars])
    assert len(samples) == len(rows) == 12
    keys = [sample["__key__"] for sample in samples]
    assert len(set(keys)) == len(keys) and not any("." in key for key in keys)
    for sample, row in zip(samples, rows, strict=True):
        assert sample["input_image.png"] == row["input_image"]["bytes"]
        assert sample["edited_image.png"] == row["edited_image"]["bytes"]
        for index, cell in enumerate(row["source_images"]):
            assert sample[f"source_{index}.png"] == cell["bytes"]
        assert sample["edit_prompt.txt"].decode() == row["edit_prompt"]
        meta = json.loads(sample["json"])
        assert (meta["row_id"], meta["request_id"], meta["image_index"]) == (
            row["row_id"],
            row["request_id"],
            row["image_index"],
        )
        assert meta["num_source_images"] == len(row["source_images"])
        assert "input_image" not in meta and "source_images" not in meta
    decoded = wds.autodecode.Decoder([wds.autodecode.imagehandler("pil")])(samples[0])
    assert decoded["input_image.png"].size == (16, 8)
    assert f"`{tars}`" in (out / "README.md").read_text()

    # Unchanged: nothing rewritten. One partition changed, one gone: only those tars move.
    mtimes = {p.name: p.stat().st_mtime_ns for p in tars.glob("*.tar")}
    again = build_training_dataset(sources, store, out, max_rows=4, webdataset_dir=tars)
    assert again.webdataset is not None and again.webdataset.rewritten == []
    assert {p.name: p.stat().st_mtime_ns for p in tars.glob("*.tar")} == mtimes
    changed = build_training_dataset(
        [partition_source(tmp_path, store, "alpha", 1)], store, out, webdataset_dir=tars
    )
    assert changed.webdataset is not None
    assert changed.webdataset.rewritten == ["alpha-00000.tar"]
    assert sorted(changed.webdataset.removed) == [
        "alpha-00001.tar",
        "alpha-00002.tar",
        "b.eta-00000.tar",
    ]
    assert [p.name for p in tars.iterdir() if not p.name.startswith(".")] == ["alpha-00000.tar"]
    (sample,) = _samples([tars / "alpha-00000.tar"])
    assert json.loads(sample["json"])["row_id"] == "alpha-0"


def test_the_export_refuses_a_folder_inside_the_parquet_dataset(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", base=tmp_path)
    source = partition_source(tmp_path, store, "alpha", 1)
    with pytest.raises(ValueError, match="webdataset_dir must be outside the Parquet dataset"):
        build_training_dataset([source], store, tmp_path / "ds", webdataset_dir=tmp_path / "ds/w")
    assert not (tmp_path / "ds").exists()  # refused before anything was written
