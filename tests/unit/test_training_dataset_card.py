"""Trainer columns, parameter features and the dataset card, on real Parquet in tmp_path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from upath import UPath

from flux2_pipeline.dataset import (
    CARD_FILE,
    DATASET_SCHEMA,
    FEATURES,
    STATE_FILE,
    TRAINER_COLUMNS,
    build_training_dataset,
    load_snippet,
    parameter_column,
    storage_options,
    yaml_features,
)
from flux2_pipeline.media import ImageStore, read_manifest
from flux2_pipeline.runcomfy import PARAMETER_NAMES, EditRequest
from tests.helpers.datasets import partition_source


def _card(out: Path) -> tuple[dict[str, Any], str]:
    text = (out / CARD_FILE).read_text()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    parsed = yaml.safe_load(header)
    assert isinstance(parsed, dict)
    return parsed, body


def test_parameter_columns_follow_edit_request() -> None:
    python_to_arrow = {float: "double", int: "int64", bool: "bool"}
    for name in PARAMETER_NAMES:
        field = DATASET_SCHEMA.field(name)
        annotation = EditRequest.model_fields[name].annotation
        expected = python_to_arrow.get(annotation, "string")  # type: ignore[arg-type]
        assert str(field.type) == expected, name
    assert "one of jpeg, png, webp" in parameter_column("output_format").description
    assert DATASET_SCHEMA.names[:3] == list(TRAINER_COLUMNS)
    assert {"prompt", "source_images", "num_source_images", "partition"} <= set(FEATURES)


def test_card_features_are_what_datasets_reads_from_yaml() -> None:
    datasets = pytest.importorskip("datasets")
    assert datasets.Features._from_yaml_list(yaml_features()) == datasets.Features.from_dict(
        FEATURES
    )


def test_input_image_is_the_first_reference_byte_for_byte(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", base=tmp_path)
    sources = [
        partition_source(tmp_path, store, "one", 2),
        partition_source(tmp_path, store, "many", 3, images=2, references=3),
    ]
    build_training_dataset(sources, store, tmp_path / "ds")
    first_reference = {
        (source.key, record.row_id): record
        for source in sources
        for record in read_manifest(source.manifest_path)
        if record.role == "source" and record.index == 0
    }
    rows = [
        row
        for shard in sorted((tmp_path / "ds" / "train").glob("*.parquet"))
        for row in pq.read_table(shard).to_pylist()
    ]
    assert len(rows) == 2 + 3 * 2
    for row in rows:
        record = first_reference[(row["partition"], row["row_id"])]
        assert record.path is not None
        stored = (tmp_path / record.path).read_bytes()
        assert row["input_image"]["bytes"] == stored
        assert row["input_image"] == row["source_images"][0]
        assert hashlib.sha256(stored).hexdigest() == row["source_sha256s"][0]
        assert row["num_source_images"] == len(row["source_images"])
        assert row["edit_prompt"] == row["prompt"]
    assert {row["num_source_images"] for row in rows} == {1, 3}


def test_card_header_parses_counts_match_and_it_follows_the_partitions(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", base=tmp_path)
    out = tmp_path / "ds"
    sources = [
        partition_source(tmp_path, store, "alpha", 5, images=2),
        partition_source(tmp_path, store, "beta", 2, references=2),
    ]
    report = build_training_dataset(sources, store, out, max_rows=4, input_dir="data/prompts")
    header, body = _card(out)
    shards = sorted(f"train/{p.name}" for p in (out / "train").glob("*.parquet"))
    rows = sum(pq.ParquetFile(out / shard).metadata.num_rows for shard in shards)
    assert rows == report.rows == 12
    (split,) = header["dataset_info"]["splits"]
    assert (split["name"], split["num_examples"]) == ("train", rows)
    assert header["dataset_info"]["download_size"] == sum((out / s).stat().st_size for s in shards)
    assert header["dataset_info"]["features"] == yaml_features()
    ((config,),) = [header["configs"]]
    assert config["data_files"] == [{"split": "train", "path": shards}]
    assert "| `alpha` | 10 | 3 | 0 |" in body and "| `beta` | 2 | 1 | 0 |" in body
    assert "| **all** | **12** | **4** | **0** |" in body
    assert "| `num_source_images` | `1` (10), `2` (2) |" in body
    assert "| `num_images` | `2` (10), `1` (2) |" in body
    assert "`data/prompts/<partition>.parquet`" in body
    assert load_snippet(UPath(out)) in body
    assert "--dataset_name=" + str(UPath(out)) in body

    # Unchanged inputs: neither shards nor the card are rewritten.
    mtime = (out / CARD_FILE).stat().st_mtime_ns
    again = build_training_dataset(sources, store, out, max_rows=4, input_dir="data/prompts")
    assert again.rebuilt == [] and again.value_counts == report.value_counts
    assert (out / CARD_FILE).stat().st_mtime_ns == mtime
    state = json.loads((out / STATE_FILE).read_text())
    assert state["partitions"]["beta"]["value_counts"]["num_source_images"] == {"2": 2}

    # A partition gone and one changed: the card says so.
    build_training_dataset(
        [partition_source(tmp_path, store, "alpha", 1)],
        store,
        out,
        max_rows=4,
        input_dir="data/prompts",
    )
    header, body = _card(out)
    assert header["dataset_info"]["splits"][0]["num_examples"] == 1
    assert header["configs"][0]["data_files"] == [
        {"split": "train", "path": ["train/alpha-00000.parquet"]}
    ]
    assert "`beta`" not in body and "| **all** | **1** | **1** | **0** |" in body

    datasets = pytest.importorskip("datasets")
    # `load_dataset(<folder>)` (diffusers' --dataset_name) reads the card's configs.
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    assert list(ds) == ["train"] and len(ds["train"]) == 1
    assert ds["train"].features == datasets.Features.from_dict(FEATURES)


def test_storage_options_carry_the_endpoint_and_never_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:pw@127.0.0.1:9000/?X-Amz-Signature=abc")
    remote = UPath("s3://bucket/out/flux2_training_dataset")
    assert storage_options(remote) == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000/"}}
    snippet = load_snippet(remote)
    for secret in ("AKIDSECRETKEYID", "s3cr3t-value", "pw", "Signature"):
        assert secret not in snippet
    assert '{"train": "s3://bucket/out/flux2_training_dataset/train/*.parquet"}' in snippet
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage_options(remote) == {}
    assert storage_options(UPath("/tmp/ds")) is None
