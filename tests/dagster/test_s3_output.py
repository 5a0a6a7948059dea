"""FLUX2_OUTPUT_DIR=s3://bucket/prefix: every dataset lands in a real S3-compatible server.

The server is moto on 127.0.0.1 (the `s3_endpoint` / `s3_bucket` fixtures); inputs stay
local, the ledger is a local SQLite file, and nothing may appear under a local output folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance
from PIL import Image

from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table

datasets = pytest.importorskip("datasets")
s3fs = pytest.importorskip("s3fs")

CLI = Path(sys.executable).with_name("flux2-pipeline")


@pytest.fixture
def s3_settings(
    settings: Settings, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The test settings with the output in the bucket and a local SQLite ledger."""
    monkeypatch.setenv("FLUX2_OUTPUT_DIR", f"s3://{s3_bucket}/out")
    monkeypatch.setenv("FLUX2_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    return Settings.from_env()


def _fs() -> Any:
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return fs


def _read(fs: Any, key: str) -> list[dict[str, Any]]:
    with fs.open(key, "rb") as handle:
        rows: list[dict[str, Any]] = pq.read_table(handle).to_pylist()
    return rows


def test_every_dataset_lands_in_the_bucket_and_a_rerun_pays_and_fetches_nothing(
    s3_settings: Settings,
    s3_bucket: str,
    s3_endpoint: str,
    emulator: EmulatorServer,
    instance: DagsterInstance,
    tmp_path: Path,
) -> None:
    base = emulator.base_url
    write_table(Path(s3_settings.storage.input_dir), "alpha", prompt_rows(base, "alpha", 3))
    write_table(
        Path(s3_settings.storage.input_dir),
        "beta",
        prompt_rows(base, "beta", 2, num_images=2, image_size="square", output_format="jpeg"),
    )
    report = run_backfill(s3_settings, instance=instance, log_level="WARNING")
    assert report.succeeded, report
    assert [s.images for s in report.partitions] == [3 + 3, 2 + 4]
    assert [str(s.results_path) for s in report.partitions] == [
        f"s3://{s3_bucket}/out/flux2_edits/{key}.parquet" for key in ("alpha", "beta")
    ]
    assert report.dataset is not None and (report.dataset.rows, report.dataset.shards) == (7, 2)
    assert str(report.dataset.path) == f"s3://{s3_bucket}/out/flux2_training_dataset"

    # Nothing under any local output folder: the default one, the input folder's sibling.
    assert not (tmp_path / "output").exists()
    assert sorted(p.name for p in Path(s3_settings.storage.input_dir).iterdir()) == [
        "alpha.parquet",
        "beta.parquet",
    ]

    fs = _fs()
    root = f"{s3_bucket}/out"
    results = {key: _read(fs, f"{root}/flux2_edits/{key}.parquet") for key in ("alpha", "beta")}
    for key, rows in results.items():
        assert [r["status"] for r in rows] == ["completed"] * len(rows), key
        request_ids = [r["request_id"] for r in rows]
        assert None not in request_ids and len(set(request_ids)) == len(request_ids)
        assert all(r["attempts"] == 1 and r["error"] is None for r in rows)
    all_ids = [r["request_id"] for rows in results.values() for r in rows]
    assert len(set(all_ids)) == len(all_ids)

    stored: set[str] = set()
    for key in ("alpha", "beta"):
        manifest = _read(fs, f"{root}/flux2_images/{key}.parquet")
        for row in manifest:
            assert row["status"] == "ok"
            ext = "jpg" if row["format"] == "JPEG" else "png"
            assert row["path"] == f"images/{row['sha256'][:2]}/{row['sha256']}.{ext}"
            data = fs.cat_file(f"{root}/{row['path']}")
            assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["bytes"]
            stored.add(row["path"])
        with fs.open(f"{root}/flux2_images/{key}.contact.png", "rb") as handle:
            assert Image.open(handle).format == "PNG"
    objects = [path for path in fs.find(root) if "/images/" in path]
    assert sorted(objects) == sorted(f"{root}/{path}" for path in stored)
    assert not [path for path in fs.find(root) if path.endswith(".tmp")]

    shards = sorted(fs.glob(f"{root}/flux2_training_dataset/train/*.parquet"))
    assert [p.rsplit("/", 1)[-1] for p in shards] == ["alpha-00000.parquet", "beta-00000.parquet"]
    assert fs.exists(f"{root}/flux2_training_dataset/.flux2_state.json")

    # `datasets` reads the shards straight from the bucket through fsspec/s3fs.
    ds = datasets.load_dataset(
        "parquet",
        data_files=[f"s3://{path}" for path in shards],
        storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}},
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert len(ds) == 7
    assert [row["partition"] for row in ds] == ["alpha"] * 3 + ["beta"] * 4
    by_row = {(key, r["row_id"]): r for key, rows in results.items() for r in rows}
    raw = ds.cast_column("edited_image", datasets.Image(decode=False))
    for row, undecoded in zip(ds, raw, strict=True):
        source = by_row[(row["partition"], row["row_id"])]
        assert (row["prompt"], row["request_id"]) == (source["prompt"], source["request_id"])
        image = row["edited_image"]
        assert isinstance(image, Image.Image)
        image.load()
        assert image.size == (row["width"], row["height"])
        edited = undecoded["edited_image"]["bytes"]
        assert hashlib.sha256(edited).hexdigest() == row["edited_sha256"]
        assert Image.open(io.BytesIO(edited)).size == image.size
        assert len(row["source_images"]) == len(source["image_urls"])

    # A re-run downloads nothing, pays nothing and rewrites no shard.
    etags = {path: fs.info(path)["ETag"] for path in shards}
    modified = {path: fs.info(path)["LastModified"] for path in shards}
    emulator.state.reset_counters()
    again = run_backfill(s3_settings, instance=instance, log_level="WARNING")
    assert again.succeeded, again
    assert emulator.state.counters.image_fetches == 0
    assert emulator.state.counters.jobs_created == 0
    fs = _fs()
    assert {path: fs.info(path)["ETag"] for path in shards} == etags
    assert {path: fs.info(path)["LastModified"] for path in shards} == modified
    assert not (tmp_path / "output").exists()


def test_cli_materialize_to_s3_prints_s3_paths_and_exits_0(
    s3_settings: Settings, s3_bucket: str, emulator: EmulatorServer, tmp_path: Path
) -> None:
    write_table(
        Path(s3_settings.storage.input_dir), "gamma", prompt_rows(emulator.base_url, "gamma", 2)
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("DAGSTER_")}
    env["HOME"] = str(tmp_path / "home")  # the default DAGSTER_HOME for a remote output
    completed = subprocess.run(
        [str(CLI), "materialize"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "gamma" in completed.stdout
    assert f"at s3://{s3_bucket}/out/flux2_training_dataset" in completed.stdout
    assert list((tmp_path / "home" / ".flux2-pipeline" / "dagster").iterdir())
    fs = _fs()
    assert fs.exists(f"{s3_bucket}/out/flux2_edits/gamma.parquet")
    assert not (tmp_path / "output").exists()
