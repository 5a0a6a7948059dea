"""The `flux2/...` metadata keys are public: the typed sets write exactly these keys, with the
value types Dagster stored before the sets existed, and read them back from stored metadata
or from its plain values."""

from __future__ import annotations

import pytest
from dagster import (
    FloatMetadataValue,
    IntMetadataValue,
    MarkdownMetadataValue,
    MaterializeResult,
    MetadataValue,
    PathMetadataValue,
    TextMetadataValue,
    asset,
    instance_for_test,
    materialize,
)

from flux2_pipeline.assets.metadata import (
    DatasetMetadata,
    EditsMetadata,
    EditsProgress,
    EstimateMetadata,
    Flux2Metadata,
    ImagesMetadata,
    InputMetadata,
    StepFailureMetadata,
)
from flux2_pipeline.batch.estimate import PriceQuote, RunEstimate, UnpaidWork

PUBLIC_KEYS: dict[type[Flux2Metadata], str] = {
    EditsProgress: "rows_total rows_done rows_failed cost_usd seconds ledger_spent_usd",
    InputMetadata: "input_path input_sha256 input_sha256_now",
    EditsMetadata: "input_path input_sha256 input_sha256_now completed failed invalid "
    "cancelled cost_usd latency_mean_s latency_p95_s submitted reused_completed polled_known "
    "unknown_resubmitted outcome_unknown waited_for_claim not_submitted_references "
    "over_budget account_refused new_spend_usd ledger_spent_usd seconds rows_per_second "
    "input_largest_row_group results_path preview partition account_refusal",
    EstimateMetadata: "price_source rows_to_pay images_to_pay price_per_image_usd "
    "estimated_cost_usd balance_usd balance_note",
    ImagesMetadata: "images_stored images_downloaded images_reused images_failed "
    "images_expired result_refreshes images_not_decoded bytes_downloaded bytes_stored "
    "manifest contact_sheet_path contact_sheet",
    DatasetMetadata: "shards bytes partitions partitions_rebuilt partitions_removed "
    "images_skipped path features features_md load card value_counts",
    StepFailureMetadata: "interrupted partition_failures",
}
"""Each set's fields: the keys `flux2/<field>`, public, never renamed."""


@pytest.mark.parametrize("metadata_set", list(PUBLIC_KEYS), ids=lambda s: s.__name__)
def test_each_set_declares_exactly_its_public_keys(metadata_set: type[Flux2Metadata]) -> None:
    assert metadata_set.namespace() == "flux2"
    assert list(metadata_set.model_fields) == PUBLIC_KEYS[metadata_set].split()


def test_fields_left_none_are_left_out_and_values_stay_plain() -> None:
    written = {**EditsMetadata(completed=3, cost_usd=0.5, partition="cats")}
    assert written == {"flux2/completed": 3, "flux2/cost_usd": 0.5, "flux2/partition": "cats"}
    progress = dict(EditsProgress(rows_total=4, rows_done=1, cost_usd=0.1, seconds=2.0))
    assert progress == {
        "flux2/rows_total": 4,
        "flux2/rows_done": 1,
        "flux2/rows_failed": 0,
        "flux2/cost_usd": 0.1,
        "flux2/seconds": 2.0,
    }


def test_read_back_from_stored_metadata_and_from_its_plain_values() -> None:
    stored = {
        "flux2/completed": MetadataValue.int(3),
        "flux2/latency_mean_s": MetadataValue.float(1.5),
        "flux2/results_path": MetadataValue.path("/out/cats.parquet"),
        "flux2/preview": MetadataValue.md("| row_id |"),
        "flux2/rows_total": MetadataValue.int(9),  # another set's key: ignored
        "dagster/row_count": MetadataValue.int(3),
        "error": "not namespaced",
    }
    plain = {key: getattr(value, "value", value) for key, value in stored.items()}
    expected = EditsMetadata(
        completed=3,
        latency_mean_s=1.5,
        results_path=MetadataValue.path("/out/cats.parquet"),
        preview=MetadataValue.md("| row_id |"),
    )
    assert EditsMetadata.extract(stored) == expected
    assert EditsMetadata.extract(plain) == expected
    assert EditsProgress.extract(plain) == EditsProgress(rows_total=9)
    failures = StepFailureMetadata.extract({"flux2/partition_failures": {"b": {"error": "x"}}})
    assert failures.partition_failures == MetadataValue.json({"b": {"error": "x"}})
    assert failures.interrupted is None


def test_run_storage_keeps_the_value_types() -> None:
    @asset
    def edits() -> MaterializeResult[None]:
        metadata = EditsMetadata(
            completed=3,
            cost_usd=0.25,
            latency_p95_s=2.0,
            results_path=MetadataValue.path("/out/cats.parquet"),
            preview=MetadataValue.md("| row_id |"),
            partition="cats",
        )
        return MaterializeResult(metadata=dict(metadata))

    with instance_for_test() as instance:
        assert materialize([edits], instance=instance).success
        event = instance.get_latest_materialization_event(edits.key)
        assert event is not None and event.asset_materialization is not None
        stored = event.asset_materialization.metadata
    assert {key: type(value) for key, value in stored.items()} == {
        "flux2/completed": IntMetadataValue,
        "flux2/cost_usd": FloatMetadataValue,
        "flux2/latency_p95_s": FloatMetadataValue,
        "flux2/results_path": PathMetadataValue,
        "flux2/preview": MarkdownMetadataValue,
        "flux2/partition": TextMetadataValue,
    }
    assert EditsMetadata.extract(stored).results_path == MetadataValue.path("/out/cats.parquet")


@pytest.mark.parametrize(
    ("estimate", "expected"),
    [
        (
            RunEstimate(PriceQuote(0.025, "setting"), UnpaidWork(4, 6), 1.23456789, "ignored"),
            {
                "flux2/price_source": "setting",
                "flux2/rows_to_pay": 4,
                "flux2/images_to_pay": 6,
                "flux2/price_per_image_usd": 0.025,
                "flux2/estimated_cost_usd": 0.15,
                "flux2/balance_usd": 1.234568,
            },
        ),
        (
            RunEstimate(PriceQuote(None, "no price"), UnpaidWork(2, 2), None, "refused"),
            {
                "flux2/price_source": "no price",
                "flux2/rows_to_pay": 2,
                "flux2/images_to_pay": 2,
                "flux2/balance_note": "refused",
            },
        ),
        (
            RunEstimate(PriceQuote(None, "no price"), UnpaidWork(), None, ""),
            {"flux2/price_source": "no price", "flux2/rows_to_pay": 0, "flux2/images_to_pay": 0},
        ),
    ],
)
def test_the_estimate_figures(estimate: RunEstimate, expected: dict[str, object]) -> None:
    assert dict(EstimateMetadata.of(estimate)) == expected
