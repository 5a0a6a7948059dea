"""Asset checks on `flux2_edits`, each read back from the written results file.

Example: in the Dagster UI each partition of flux2_edits shows these four checks;
`flux2-pipeline materialize` runs them right after the asset.
"""

from collections import Counter
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    DynamicPartitionsDefinition,
    asset_check,
)

from flux2_pipeline.assets.keys import Flux2Keys
from flux2_pipeline.paths import read_parquet
from flux2_pipeline.resources import Flux2Storage

EXAMPLES = 5


def _results(storage: Flux2Storage, key: str, columns: Sequence[str]) -> pa.Table:
    return read_parquet(storage.results_path(key), columns=columns)


def _examples(table: pa.Table) -> str:
    head = table.slice(0, EXAMPLES)
    pairs = zip(head["row_id"].to_pylist(), head["error"].to_pylist(), strict=True)
    return "; ".join(f"{row_id}: {error}" for row_id, error in pairs)


def build_edits_checks(
    keys: Flux2Keys, partitions_def: DynamicPartitionsDefinition
) -> list[AssetChecksDefinition]:
    """The checks on flux2_edits, one result per partition."""

    @asset_check(
        asset=keys.edits,
        required_resource_keys={keys.resource("storage")},
        name="all_valid_rows_completed",
        partitions_def=partitions_def,
        description="Every row that passed validation completed (ERROR).",
    )
    def all_valid_rows_completed(context: AssetCheckExecutionContext) -> AssetCheckResult:
        storage: Flux2Storage = getattr(context.resources, keys.resource("storage"))
        table = _results(storage, context.partition_key, ["row_id", "status", "error"])
        status = table["status"]
        unfinished = table.filter(
            pc.and_(pc.not_equal(status, "completed"), pc.not_equal(status, "invalid"))
        )
        return AssetCheckResult(
            passed=unfinished.num_rows == 0,
            severity=AssetCheckSeverity.ERROR,
            metadata={"not_completed": unfinished.num_rows, "examples": _examples(unfinished)},
        )

    @asset_check(
        asset=keys.edits,
        required_resource_keys={keys.resource("storage")},
        name="request_ids_unique",
        partitions_def=partitions_def,
        description="No request_id appears on two rows: no job was paid for twice (ERROR).",
    )
    def request_ids_unique(context: AssetCheckExecutionContext) -> AssetCheckResult:
        storage: Flux2Storage = getattr(context.resources, keys.resource("storage"))
        table = _results(storage, context.partition_key, ["request_id"])
        counts = Counter(rid for rid in table["request_id"].to_pylist() if rid is not None)
        repeated = sorted(rid for rid, n in counts.items() if n > 1)
        return AssetCheckResult(
            passed=not repeated,
            severity=AssetCheckSeverity.ERROR,
            metadata={"repeated": len(repeated), "examples": ", ".join(repeated[:EXAMPLES])},
        )

    @asset_check(
        asset=keys.edits,
        required_resource_keys={keys.resource("storage")},
        name="no_invalid_rows",
        partitions_def=partitions_def,
        description="Reports rows that break the input schema, with the reason (WARN).",
    )
    def no_invalid_rows(context: AssetCheckExecutionContext) -> AssetCheckResult:
        storage: Flux2Storage = getattr(context.resources, keys.resource("storage"))
        table = _results(storage, context.partition_key, ["row_id", "status", "error"])
        invalid = table.filter(pc.equal(table["status"], "invalid"))
        return AssetCheckResult(
            passed=invalid.num_rows == 0,
            severity=AssetCheckSeverity.WARN,
            metadata={"invalid_rows": invalid.num_rows, "examples": _examples(invalid)},
        )

    @asset_check(
        asset=keys.edits,
        required_resource_keys={keys.resource("storage")},
        name="completed_rows_have_all_images",
        partitions_def=partitions_def,
        description="Every completed row has num_images output URLs (ERROR).",
    )
    def completed_rows_have_all_images(context: AssetCheckExecutionContext) -> AssetCheckResult:
        storage: Flux2Storage = getattr(context.resources, keys.resource("storage"))
        table = _results(
            storage, context.partition_key, ["row_id", "status", "num_images", "output_urls"]
        )
        completed = table.filter(pc.equal(table["status"], "completed"))
        found = pc.list_value_length(completed["output_urls"])
        short = completed.filter(pc.not_equal(found, completed["num_images"]))
        return AssetCheckResult(
            passed=short.num_rows == 0,
            severity=AssetCheckSeverity.ERROR,
            metadata={
                "rows_missing_images": short.num_rows,
                "examples": ", ".join(short["row_id"].to_pylist()[:EXAMPLES]),
            },
        )

    return [
        all_valid_rows_completed,
        request_ids_unique,
        no_invalid_rows,
        completed_rows_have_all_images,
    ]
