"""`flux2_images`: every image of a partition's completed rows, stored by content.

The step reads `flux2_edits/<key>.parquet`, fetches each reference and output image of
the completed rows into `$FLUX2_OUTPUT_DIR/images/<sha[:2]>/<sha>.<ext>` (see
`flux2_pipeline.media`), writes the manifest `flux2_images/<key>.parquet` and a contact
sheet `flux2_images/<key>.contact.png`, and then fails if any image is missing, naming
the first ones. Its `RetryPolicy` runs it again; images already stored are not fetched
again, so a retry downloads only what is missing.

An edited image whose URL is gone (403/404/410) is fetched from the fresh URLs the API's
`/result` gives for its job (asked once per job); if the API no longer serves it, its
manifest row is `expired`: the step warns and goes on, and never submits the row again.

Example::

    flux2-pipeline materialize --select flux2_images --partition cats
"""

import time
from collections.abc import Iterator
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetMaterialization,
    AssetsDefinition,
    AutomationCondition,
    Config,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    TableColumn,
    TableSchema,
    asset,
)
from pydantic import Field

from flux2_pipeline.assets.edits import EDITS_RETRY_POLICY
from flux2_pipeline.assets.hooks import ExecuteHook, with_execute
from flux2_pipeline.assets.keys import Flux2Keys
from flux2_pipeline.assets.metadata import ImagesMetadata
from flux2_pipeline.assets.ranges import (
    DEFAULT_PARTITIONS_PER_RUN,
    PartitionOutcome,
    materialize_outcomes,
    ranged_backfills,
)
from flux2_pipeline.assets.uri import URI, storage_uri
from flux2_pipeline.media import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DECODES,
    EXPIRED_ERROR,
    FAILURES_KEPT,
    MANIFEST_COLUMN_DESCRIPTIONS,
    MANIFEST_SCHEMA,
    AddressPolicy,
    FetchLimits,
    ImageStore,
    OutputRefresh,
    PixelBudget,
    SyncReport,
    contact_rows,
    iter_image_refs,
    iter_manifest,
    markdown_preview,
    render_contact_sheet,
    save_png,
    sync_images_blocking,
)
from flux2_pipeline.paths import iter_parquet
from flux2_pipeline.resources import Flux2Storage, RunComfyResource
from flux2_pipeline.runcomfy import NotFoundError

IMAGES_CODE_VERSION = "1"
FAILED_IMAGES_NAMED = FAILURES_KEPT
PROGRESS_SECONDS = 10.0


class ImagesConfig(Config):
    """Download budgets of `flux2_images` (run config `ops.flux2_images.config`)."""

    max_concurrency: int = Field(
        default=DEFAULT_CONCURRENCY, ge=1, description="Most image downloads in flight at once."
    )
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_BYTES, ge=1, description="Largest image accepted, in bytes."
    )
    attempts: int = Field(
        default=4, ge=1, description="Tries per image on transient errors (timeouts, 429, 5xx)."
    )
    timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Total seconds of one download attempt (redirects and body included).",
    )
    max_pixels: int | None = Field(
        default=None,
        ge=1,
        description="The decode ceiling and budget, in pixels (width x height, read from the "
        "header); default: the storage resource's max_decode_pixels (FLUX2_MAX_DECODE_PIXELS). "
        "Larger images are stored undecoded, without a thumbnail.",
    )
    max_decodes: int = Field(
        default=DEFAULT_MAX_DECODES,
        ge=1,
        description="Most image verifications running at once (their decodes share the "
        "pixel budget).",
    )
    allow_private_networks: bool = Field(
        default=False,
        description="Fetch images from private and loopback addresses (10/8, 172.16/12, "
        "192.168/16, 127/8). Off by default; loopback is allowed anyway when the API is on "
        "loopback (the emulator). Link-local addresses are always refused.",
    )


def manifest_table_schema() -> TableSchema:
    """The image manifest's columns as a Dagster `TableSchema`."""
    return TableSchema(
        columns=[
            TableColumn(
                name=column.name,
                type=str(column.type),
                description=MANIFEST_COLUMN_DESCRIPTIONS.get(column.name),
            )
            for column in MANIFEST_SCHEMA
        ]
    )


def _failure_text(report: SyncReport) -> str:
    first = report.first_failures[:FAILED_IMAGES_NAMED]
    return " | ".join(f"{r.row_id} {r.role}[{r.index}]: {r.error}" for r in first)


def _fresh_output_urls(runcomfy: RunComfyResource) -> OutputRefresh:
    """Asks the API's `/result` for a job's output URLs; None when it no longer has them."""

    async def refresh(request_id: str) -> tuple[str, ...] | None:
        try:
            result = await runcomfy.result_elsewhere(request_id)
        except NotFoundError:
            return None
        return result.output_urls or None

    return refresh


def build_images_asset(
    keys: Flux2Keys,
    partitions_def: DynamicPartitionsDefinition,
    *,
    group_name: str = "flux2",
    retry_policy: RetryPolicy | None = EDITS_RETRY_POLICY,
    partitions_per_run: int = DEFAULT_PARTITIONS_PER_RUN,
    single_run_backfills: bool = False,
    execute: ExecuteHook | None = None,
) -> AssetsDefinition:
    """The flux2_images asset; it follows flux2_edits eagerly (each updated partition).

    Use `build_flux2_definitions`, which names it; this builds the asset alone.
    """
    storage_key, runcomfy_key = keys.resource("storage"), keys.resource("runcomfy")

    @asset(
        key=keys.images,
        partitions_def=partitions_def,
        deps=[keys.edits],
        group_name=group_name,
        code_version=IMAGES_CODE_VERSION,
        retry_policy=retry_policy,
        backfill_policy=ranged_backfills(partitions_per_run, single_run=single_run_backfills),
        automation_condition=AutomationCondition.eager(),
        required_resource_keys={storage_key, runcomfy_key},
        kinds={"parquet", "png"},
        metadata={"dagster/column_schema": manifest_table_schema()},
        description="Every reference and edited image of one partition's completed rows, "
        "stored by sha256 under images/, with a manifest (one row per image) and a "
        "contact sheet.",
    )
    @with_execute("flux2_images", execute)
    def flux2_images(
        context: AssetExecutionContext, config: ImagesConfig
    ) -> Iterator[AssetMaterialization | MaterializeResult[None] | AssetCheckResult]:
        """Fetch, verify and store each partition's images; write its manifest and sheet."""
        storage: Flux2Storage = getattr(context.resources, storage_key)
        # The API's address decides the downloader's policy: loopback only for the emulator.
        runcomfy: RunComfyResource = getattr(context.resources, runcomfy_key)

        def one_partition(key: str) -> PartitionOutcome:
            results_path = storage.results_path(key)
            if not results_path.is_file():
                failure = Failure(
                    description=f"partition {key}: no results at {results_path}; "
                    "materialize flux2_edits first",
                    allow_retries=False,
                )
                return PartitionOutcome(key, {}, failure)
            refs = iter_image_refs(iter_parquet(results_path))
            store = ImageStore(storage.images_dir(), base=storage.output_root())
            manifest_path = storage.image_manifest_path(key)
            limits = FetchLimits(
                max_bytes=config.max_image_bytes,
                attempts=config.attempts,
                timeout=config.timeout_seconds,
            )
            last_log = [time.monotonic()]
            max_pixels = config.max_pixels or storage.max_decode_pixels
            # One budget for the sync's decodes and the contact sheet's.
            budget = PixelBudget(max_pixels)

            def progress(done: int, met: int) -> None:
                if time.monotonic() - last_log[0] >= PROGRESS_SECONDS:
                    last_log[0] = time.monotonic()
                    context.log.info(
                        f"partition {key}: {done} image URLs settled of the {met} met so far"
                    )

            report = sync_images_blocking(
                refs,
                store,
                manifest_path,
                previous=manifest_path,
                policy=AddressPolicy.for_api(
                    runcomfy.base_url, allow_private=config.allow_private_networks
                ),
                limits=limits,
                max_concurrency=config.max_concurrency,
                max_decodes=config.max_decodes,
                max_pixels=max_pixels,
                budget=budget,
                on_done=progress,
                refresh=_fresh_output_urls(runcomfy),
            )
            sheet = render_contact_sheet(
                contact_rows(iter_parquet(results_path), iter_manifest(manifest_path), store),
                max_pixels=max_pixels,
                budget=budget,
            )
            sheet_path = storage.contact_sheet_path(key)
            save_png(sheet, sheet_path)
            context.log.info(
                f"partition {key}: {report.stored} images stored ({report.downloaded} downloaded, "
                f"{report.reused} reused), {report.failed} failed; manifest {manifest_path}"
            )
            if report.expired:
                first = report.first_expired[0]
                context.log.warning(
                    f"partition {key}: {report.expired} edited images expired at the API "
                    f"(first: row {first.row_id}, request {first.request_id}): {EXPIRED_ERROR}. "
                    "Nothing was submitted again; their manifest rows say 'expired'."
                )
            if report.not_decoded:
                context.log.info(
                    f"partition {key}: {report.not_decoded} stored images are above the "
                    f"{max_pixels / 1e6:g} MP decode ceiling: described from their header, "
                    "no thumbnail (see the manifest's note column)"
                )
            metadata: dict[str, Any] = {
                "dagster/row_count": report.images,
                **ImagesMetadata(
                    images_stored=report.stored,
                    images_downloaded=report.downloaded,
                    images_reused=report.reused,
                    images_failed=report.failed,
                    images_expired=report.expired,
                    result_refreshes=report.refreshed,
                    images_not_decoded=report.not_decoded,
                    bytes_downloaded=report.bytes_downloaded,
                    bytes_stored=report.bytes_stored,
                    manifest=MetadataValue.path(str(manifest_path)),
                    contact_sheet_path=MetadataValue.path(str(sheet_path)),
                    contact_sheet=MetadataValue.md(markdown_preview(sheet)),
                ),
                URI: storage_uri(manifest_path),
            }
            if report.failed:
                failure = Failure(
                    description=f"partition {key}: {report.failed} of {report.images} images "
                    f"are missing; manifest written to {manifest_path}, a retry fetches only "
                    "those. First: " + _failure_text(report),
                    metadata=metadata,
                )
                return PartitionOutcome(key, metadata, failure)
            return PartitionOutcome(key, metadata)

        outcomes = [one_partition(key) for key in context.partition_keys]
        yield from materialize_outcomes(context, keys.images, outcomes)

    return flux2_images
