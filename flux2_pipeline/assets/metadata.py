"""Every `flux2/...` metadata key the assets record, declared once as typed sets.

Each set is declared the way Dagster's own `NamespacedMetadataSet` and dagster-dlt's sets
are (the installed Dagster keeps that class private): the field `completed` is the key
`flux2/completed`. A set splats into metadata (fields left None are left out), and
`extract` reads it back from a materialization's metadata or from its plain values
(`MetadataValue.value`), ignoring every other key::

    metadata = {**EditsProgress(rows_total=12, rows_done=3, cost_usd=0.1, seconds=2.0)}
    EditsProgress.extract(metadata).rows_done  # 3
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Self, get_args

from dagster import (
    JsonMetadataValue,
    MarkdownMetadataValue,
    MetadataValue,
    PathMetadataValue,
)
from pydantic import BaseModel, ConfigDict

from flux2_pipeline.batch.estimate import RunEstimate

NAMESPACE = "flux2"
_WRAP: dict[object, Callable[[Any], MetadataValue[Any]]] = {
    PathMetadataValue: MetadataValue.path,
    MarkdownMetadataValue: MetadataValue.md,
    JsonMetadataValue: MetadataValue.json,
}


class Flux2Metadata(BaseModel):
    """A set of `flux2/<field>` metadata entries: typed, frozen, written with `**`."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @classmethod
    def namespace(cls) -> str:
        return NAMESPACE

    def keys(self) -> list[str]:
        """The keys of the fields that are set: what `{**metadata_set}` writes."""
        fields = type(self).model_fields
        return [f"{NAMESPACE}/{name}" for name in fields if getattr(self, name) is not None]

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key.removeprefix(f"{NAMESPACE}/"))

    @classmethod
    def extract(cls, metadata: Mapping[str, Any]) -> Self:
        """The set's fields found in `metadata`, stored values or plain ones."""
        found = {}
        for name, info in cls.model_fields.items():
            value = metadata.get(f"{NAMESPACE}/{name}")
            wrap = next((_WRAP[kind] for kind in get_args(info.annotation) if kind in _WRAP), None)
            if wrap is None and isinstance(value, MetadataValue):
                value = value.value
            elif wrap is not None and value is not None and not isinstance(value, MetadataValue):
                value = wrap(value)  # a path, markdown or JSON read back as its plain value
            if value is not None:
                found[name] = value
        return cls(**found)


class EditsProgress(Flux2Metadata):
    """A running edits partition's figures: its progress observations, and the failure of one
    stopped or whose input changed under it. Always written whole: read back, a figure
    missing is 0."""

    rows_total: int = 0
    rows_done: int = 0
    rows_failed: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    ledger_spent_usd: float | None = None
    """The whole ledger's spend: on observations only."""


class InputMetadata(Flux2Metadata):
    """A partition's input table: its path and content hash (on observations of
    `prompt_tables` and on materializations of `flux2_edits`)."""

    input_path: PathMetadataValue | None = None
    input_sha256: str | None = None
    input_sha256_now: str | None = None
    """The input's hash when it was found replaced while the partition ran."""


class EditsMetadata(InputMetadata):
    """A materialized `flux2_edits` partition: row counts, spend, latency, the runner's
    counters and where its results are."""

    completed: int | None = None
    failed: int | None = None
    invalid: int | None = None
    cancelled: int | None = None
    cost_usd: float | None = None
    latency_mean_s: float | None = None
    latency_p95_s: float | None = None
    submitted: int | None = None
    reused_completed: int | None = None
    polled_known: int | None = None
    unknown_resubmitted: int | None = None
    outcome_unknown: int | None = None
    waited_for_claim: int | None = None
    not_submitted_references: int | None = None
    over_budget: int | None = None
    account_refused: int | None = None
    new_spend_usd: float | None = None
    ledger_spent_usd: float | None = None
    seconds: float | None = None
    rows_per_second: float | None = None
    input_largest_row_group: int | None = None
    results_path: PathMetadataValue | None = None
    preview: MarkdownMetadataValue | None = None
    partition: str | None = None
    account_refusal: str | None = None


class EstimateMetadata(Flux2Metadata):
    """The run's price, estimate and balance before its first submit, on every partition."""

    price_source: str | None = None
    rows_to_pay: int | None = None
    images_to_pay: int | None = None
    price_per_image_usd: float | None = None
    estimated_cost_usd: float | None = None
    balance_usd: float | None = None
    balance_note: str | None = None

    @classmethod
    def of(cls, estimate: RunEstimate) -> EstimateMetadata:
        """The estimate's figures; the balance's note only when the balance is unknown."""
        balance = estimate.balance_usd
        return cls(
            price_source=estimate.price.source,
            rows_to_pay=estimate.work.rows,
            images_to_pay=estimate.work.images,
            price_per_image_usd=estimate.price.price_usd,
            estimated_cost_usd=estimate.cost_usd,
            balance_usd=round(balance, 6) if balance is not None else None,
            balance_note=(estimate.balance_note or None) if balance is None else None,
        )


class ImagesMetadata(Flux2Metadata):
    """A materialized `flux2_images` partition: its images, bytes, manifest and contact sheet."""

    images_stored: int | None = None
    images_downloaded: int | None = None
    images_reused: int | None = None
    images_failed: int | None = None
    images_expired: int | None = None
    result_refreshes: int | None = None
    images_not_decoded: int | None = None
    bytes_downloaded: int | None = None
    bytes_stored: int | None = None
    manifest: PathMetadataValue | None = None
    contact_sheet_path: PathMetadataValue | None = None
    contact_sheet: MarkdownMetadataValue | None = None


class DatasetMetadata(Flux2Metadata):
    """A materialized `flux2_training_dataset`: its shards, partitions, features and card."""

    shards: int | None = None
    bytes: int | None = None
    partitions: JsonMetadataValue | None = None
    partitions_rebuilt: JsonMetadataValue | None = None
    partitions_removed: JsonMetadataValue | None = None
    images_skipped: int | None = None
    path: PathMetadataValue | None = None
    features: JsonMetadataValue | None = None
    features_md: MarkdownMetadataValue | None = None
    load: MarkdownMetadataValue | None = None
    card: PathMetadataValue | None = None
    value_counts: JsonMetadataValue | None = None


class StepFailureMetadata(Flux2Metadata):
    """A failed step's own figures: whether its run was stopped and, in a step of several
    partitions, each failed partition's error and figures."""

    interrupted: bool | None = None
    partition_failures: JsonMetadataValue | None = None
