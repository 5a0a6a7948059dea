"""flux2_images and flux2_training_dataset through a real Dagster instance and emulator."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, DagsterInstance
from PIL import Image

from flux2_pipeline.assets import Flux2Keys
from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.media import EXPIRED, EXPIRED_ERROR, MANIFEST_SCHEMA
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table

datasets = pytest.importorskip("datasets")


def _load(path: Path, cache: Path) -> object:
    return datasets.load_dataset("parquet", data_dir=str(path), split="train", cache_dir=str(cache))


def _latest_metadata(instance: DagsterInstance, name: str) -> dict[str, object]:
    event = instance.get_latest_materialization_event(AssetKey(name))
    assert event is not None and event.asset_materialization is not None
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def test_edits_images_and_dataset_for_two_partitions_then_a_rerun_downloads_nothing(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance, tmp_path: Path
) -> None:
    base = emulator.base_url
    write_table(Path(settings.storage.input_dir), "alpha", prompt_rows(base, "alpha", 3))
    write_table(
        Path(settings.storage.input_dir),
        "beta",
        prompt_rows(base, "beta", 2, num_images=2, image_size="square", output_format="jpeg"),
    )
    report = run_backfill(settings, instance=instance, log_level="WARNING")
    assert report.succeeded, report
    assert [s.images for s in report.partitions] == [3 + 3, 2 + 4]
    assert report.dataset is not None and (report.dataset.rows, report.dataset.shards) == (7, 2)
    first_fetches = emulator.state.counters.image_fetches
    # Each distinct URL downloaded once, plus each distinct reference checked once (a HEAD)
    # before its row was paid for: alpha 3 references, beta 2.
    assert 0 < first_fetches <= (3 + 3 + 2 + 4) + (3 + 2)

    out = settings.storage.output_root()
    results = {
        key: pq.read_table(out / "flux2_edits" / f"{key}.parquet").to_pylist()
        for key in ("alpha", "beta")
    }
    for key in ("alpha", "beta"):
        manifest = pq.read_table(out / "flux2_images" / f"{key}.parquet")
        assert manifest.schema.equals(MANIFEST_SCHEMA)
        for row in manifest.to_pylist():
            assert row["status"] == "ok" and row["error"] is None
            data = (out / row["path"]).read_bytes()
            assert (
                row["path"]
                == f"images/{row['sha256'][:2]}/{row['sha256']}.{'jpg' if row['format'] == 'JPEG' else 'png'}"
            )
            assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["bytes"]
        assert (out / "flux2_images" / f"{key}.contact.png").is_file()
    assert not list((out / "images").rglob("*.tmp"))

    images_meta = _latest_metadata(instance, "flux2_images")
    sheet = images_meta["flux2/contact_sheet"]
    assert isinstance(sheet, str) and sheet.startswith("![contact sheet](data:image/png;base64,")
    assert len(sheet) < 300_000

    # The dataset loads with images decoded, and every row traces back to flux2_edits.
    ds = _load(out / "flux2_training_dataset", tmp_path / "hf")
    assert len(ds) == 7
    assert [row["partition"] for row in ds] == ["alpha"] * 3 + ["beta"] * 4
    by_row = {(key, r["row_id"]): r for key, rows in results.items() for r in rows}
    raw = ds.cast_column("edited_image", datasets.Image(decode=False))
    for row, undecoded in zip(ds, raw, strict=True):
        source = by_row[(row["partition"], row["row_id"])]
        assert (row["prompt"], row["request_id"]) == (source["prompt"], source["request_id"])
        assert row["seed"] == source["seed"] and row["image_size"] == source["image_size"]
        image = row["edited_image"]
        assert isinstance(image, Image.Image)
        image.load()
        assert image.size == (row["width"], row["height"])
        assert (
            hashlib.sha256(undecoded["edited_image"]["bytes"]).hexdigest() == row["edited_sha256"]
        )
        assert len(row["source_images"]) == len(source["image_urls"])
        assert all(isinstance(s, Image.Image) for s in row["source_images"])
    assert {row["image_size"]: (row["width"], row["height"]) for row in ds} == {
        "square_hd": (1024, 1024),
        "square": (512, 512),
    }

    # A re-run downloads nothing, pays nothing and rewrites no shard.
    shards = sorted((out / "flux2_training_dataset" / "train").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in shards]
    emulator.state.reset_counters()
    again = run_backfill(settings, instance=instance, log_level="WARNING")
    assert again.succeeded
    assert emulator.state.counters.image_fetches == 0
    assert emulator.state.counters.jobs_created == 0
    assert (
        _latest_metadata(instance, "flux2_images")["flux2/images_reused"] == 2 + 4
    )  # beta: 2 references, 4 edits
    dataset_meta = _latest_metadata(instance, "flux2_training_dataset")
    assert dataset_meta["flux2/partitions_rebuilt"] == []
    assert dataset_meta["dagster/row_count"] == 7
    assert [p.stat().st_mtime_ns for p in shards] == mtimes

    # Changing one partition rewrites only its shards.
    write_table(
        Path(settings.storage.input_dir),
        "beta",
        prompt_rows(base, "beta", 3, num_images=2, image_size="square", output_format="jpeg"),
    )
    changed = run_backfill(settings, instance=instance, partitions=["beta"], log_level="WARNING")
    assert changed.succeeded and changed.dataset is not None and changed.dataset.rows == 9
    assert _latest_metadata(instance, "flux2_training_dataset")["flux2/partitions_rebuilt"] == [
        "beta"
    ]
    alpha_shard = out / "flux2_training_dataset" / "train" / "alpha-00000.parquet"
    assert alpha_shard.stat().st_mtime_ns == mtimes[shards.index(alpha_shard)]
    assert len(_load(out / "flux2_training_dataset", tmp_path / "hf2")) == 9


def test_image_checks_pass_on_the_happy_path(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    write_table(
        Path(settings.storage.input_dir),
        "checked",
        prompt_rows(emulator.base_url, "checked", 3, image_size="landscape_4_3"),
    )
    defs = settings.definitions()
    instance.add_dynamic_partitions(Flux2Keys().partitions_name, ["checked"])
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        partition_key="checked",
        asset_selection=[AssetKey("flux2_edits"), AssetKey("flux2_images")],
    )
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["edited_images_stored"].passed
    assert evaluations["edited_images_stored"].metadata["edited_images_expected"].value == 3
    assert evaluations["edited_image_sizes_match_preset"].passed
    assert (
        evaluations["edited_image_sizes_match_preset"].metadata["edited_images_checked"].value == 3
    )


def test_an_output_the_api_deleted_is_an_expired_row_and_the_rest_is_stored(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    write_table(
        Path(settings.storage.input_dir), "expiry", prompt_rows(emulator.base_url, "expiry", 2)
    )
    (edits,) = run_backfill(settings, instance=instance, select=["flux2_edits"]).partitions
    assert edits.succeeded and edits.results_path is not None
    gone = pq.read_table(edits.results_path).to_pylist()[0]
    del emulator.state.jobs[gone["request_id"]]  # its output URL and /result now answer 404
    submits = emulator.state.counters.submits_total

    report = run_backfill(
        settings, instance=instance, select=["flux2_images"], log_level="CRITICAL"
    )
    (summary,) = report.partitions
    # An expired output is not a failure a retry could mend: the step stores the rest.
    assert summary.succeeded, summary.error
    assert (summary.images, summary.images_failed) == (3, 0)
    rows = pq.read_table(
        settings.storage.output_root() / "flux2_images" / "expiry.parquet"
    ).to_pylist()
    (expired,) = [r for r in rows if r["status"] != "ok"]
    assert expired["status"] == EXPIRED and expired["error"] == EXPIRED_ERROR
    assert expired["row_id"] == "expiry-0" and expired["role"] == "edited"
    assert expired["sha256"] is None and expired["path"] is None
    files = [p for p in (settings.storage.output_root() / "images").rglob("*") if p.is_file()]
    assert len(files) == 3 and not [p for p in files if p.name.startswith(".")]
    assert emulator.state.counters.submits_total == submits  # never submitted again

    # A re-run fetches only what is missing (the gone URL, and one /result again).
    emulator.state.reset_counters()
    (again,) = run_backfill(
        settings, instance=instance, select=["flux2_images"], log_level="CRITICAL"
    ).partitions
    assert again.succeeded
    counters = emulator.state.counters
    assert (counters.image_fetches, counters.result_calls, counters.submits_total) == (1, 1, 0)


def test_a_small_size_cap_fails_every_image_and_leaves_nothing_behind(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    write_table(
        Path(settings.storage.input_dir), "capped", prompt_rows(emulator.base_url, "capped", 1)
    )
    defs = settings.definitions()
    instance.add_dynamic_partitions(Flux2Keys().partitions_name, ["capped"])
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        partition_key="capped",
        asset_selection=[AssetKey("flux2_edits"), AssetKey("flux2_images")],
        run_config={"ops": {"flux2_images": {"config": {"max_image_bytes": 1000}}}},
        raise_on_error=False,
    )
    assert not result.success
    rows = pq.read_table(
        settings.storage.output_root() / "flux2_images" / "capped.parquet"
    ).to_pylist()
    assert len(rows) == 2 and all(r["error"].startswith("too_large: ") for r in rows)
    assert not any(p.is_file() for p in (settings.storage.output_root() / "images").rglob("*"))
    assert (
        Image.open(
            io.BytesIO(
                (
                    settings.storage.output_root() / "flux2_images" / "capped.contact.png"
                ).read_bytes()
            )
        ).size[0]
        > 0
    )
