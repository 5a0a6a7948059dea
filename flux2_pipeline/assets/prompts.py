"""The input prompt tables: one dynamic partition per Parquet file, and the sensor.

A file `<key>.parquet` in the input folder is partition `<key>`. The sensor
registers new files as partitions and asks for a run of each new or changed file;
its run key holds the file's sha256, so an unchanged file never runs twice and an
edited one runs again.

Example::

    result = flux2_prompt_files_sensor(build_sensor_context(instance=instance,
                                                            resources={"storage": storage}))
"""

import json
from typing import Any

from dagster import (
    AssetKey,
    DataVersion,
    DataVersionsByPartition,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    ObserveResult,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    observable_source_asset,
    sensor,
)

from flux2_pipeline.batch import file_sha256
from flux2_pipeline.resources import Flux2Storage

PARTITIONS_NAME = "flux2_prompt_tables"
PROMPT_TABLES_KEY = AssetKey("flux2_prompt_tables")

prompt_table_partitions = DynamicPartitionsDefinition(name=PARTITIONS_NAME)
"""One partition per input file; key = file stem."""


@observable_source_asset(
    key=PROMPT_TABLES_KEY,
    partitions_def=prompt_table_partitions,
    group_name="flux2",
    description="Input prompt tables: one Parquet file per partition in FLUX2_INPUT_DIR. "
    "The data version of a partition is the sha256 of its file.",
)
def flux2_prompt_tables(storage: Flux2Storage) -> ObserveResult | DataVersionsByPartition:
    """Observe every input file's content hash as its partition's data version."""
    found, _ = storage.scan_inputs()
    return DataVersionsByPartition(
        {key: DataVersion(file_sha256(path)) for key, path in found.items()}
    )


def _load_cursor(raw: str | None) -> dict[str, dict[str, Any]]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


@sensor(
    name="flux2_prompt_files_sensor",
    asset_selection=["flux2_edits", "flux2_images"],
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.STOPPED,
    description="Registers each Parquet file in FLUX2_INPUT_DIR as a partition and requests "
    "a run for every new or changed file.",
)
def flux2_prompt_files_sensor(
    context: SensorEvaluationContext, storage: Flux2Storage
) -> SensorResult:
    """New file: add a partition and a run. Changed file: a run. Unchanged: nothing."""
    found, rejected = storage.scan_inputs()
    for name, problem in rejected.items():
        context.log.warning(f"skipped input file {name}: its name {problem}")
    known = set(context.instance.get_dynamic_partitions(PARTITIONS_NAME))
    new_keys = [key for key in found if key not in known]
    cursor = _load_cursor(context.cursor)
    run_requests = []
    for key, path in found.items():
        stat = path.stat()
        signature = f"{stat.st_size}:{stat.st_mtime_ns}"
        seen = cursor.get(key, {})
        if seen.get("signature") == signature and key in known:
            continue  # same size and mtime: skip hashing a file we already ran
        digest = file_sha256(path)
        cursor[key] = {"signature": signature, "sha256": digest}
        if seen.get("sha256") == digest and key in known:
            continue
        run_requests.append(
            RunRequest(
                run_key=f"{key}:{digest}",
                partition_key=key,
                tags={"flux2/input_sha256": digest},
            )
        )
    for key in list(cursor):
        if key not in found:
            del cursor[key]
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=(
            [prompt_table_partitions.build_add_request(new_keys)] if new_keys else []
        ),
        cursor=json.dumps(cursor, sort_keys=True),
    )
