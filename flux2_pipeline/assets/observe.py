"""The prompt tables observed without a run: each file's sha256 as its data version.

`build_observation_sensor` runs by default (unlike the file sensor, which asks for paid
runs): each tick it registers new files as partitions and records an `AssetObservation`
of `flux2_prompt_tables` carrying the sha256 of every new or changed file as the
partition's data version. Dagster's staleness then compares it with what `flux2_edits`
last read, so a changed file shows its partition stale in the UI and to automation
conditions. Files whose size and modification time are unchanged are not hashed again.

`register_partitions_on_load` lets `dg launch --partition KEY` and the UI launch a file's
partition on a fresh instance, before any sensor has run: when the code location loads
with a configured instance (DAGSTER_HOME), the input folder's new files are added as
partitions (a folder listing and one query; see benchmarks/README.md for its cost).

Example::

    sensor = defs.get_sensor_def(Flux2Keys().observation_sensor_name)
    result = sensor(build_sensor_context(instance=instance, resources={"flux2_storage": s}))
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from dagster import (
    AssetObservation,
    DagsterInstance,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from flux2_pipeline.assets.keys import Flux2Keys
from flux2_pipeline.assets.metadata import InputMetadata
from flux2_pipeline.assets.prompts import (
    DATA_VERSION_TAG,
    new_partition_keys,
    register_input_files,
)
from flux2_pipeline.batch import file_sha256
from flux2_pipeline.resources import Flux2Storage

OBSERVATION_INTERVAL_SECONDS = 60

logger = logging.getLogger(__name__)


def _signature(path: Any) -> str:
    """Size and modification time: what decides whether a file is hashed again (an
    object store's listing may give the time in seconds only)."""
    stat = path.stat()
    modified = getattr(stat, "st_mtime_ns", None) or getattr(stat, "st_mtime", "")
    return f"{stat.st_size}:{modified}"


def build_observation_sensor(
    keys: Flux2Keys, partitions_def: DynamicPartitionsDefinition
) -> SensorDefinition:
    """The sensor that registers input files and observes their sha256 (no runs)."""

    @sensor(
        name=keys.observation_sensor_name,
        minimum_interval_seconds=OBSERVATION_INTERVAL_SECONDS,
        default_status=DefaultSensorStatus.RUNNING,
        required_resource_keys={keys.resource("storage")},
        description="Registers each Parquet file in FLUX2_INPUT_DIR as a partition and records "
        "the sha256 of each new or changed file as its data version (an observation of "
        "flux2_prompt_tables): staleness without launching a run.",
    )
    def observation_sensor(context: SensorEvaluationContext, **_given: Any) -> SensorResult:
        """New file: a partition. Registered file, new or changed: an observation."""
        storage: Flux2Storage = getattr(context.resources, keys.resource("storage"))
        scan = storage.scan_inputs()
        new_keys = new_partition_keys(context.instance, keys, scan)
        cursor: dict[str, dict[str, str]] = _load(context.cursor)
        events = []
        for key, path in scan.found.items():
            if key in new_keys:
                continue  # observed on the next tick, once its partition exists
            signature = _signature(path)
            seen = cursor.get(key, {})
            if seen.get("signature") == signature:
                continue
            digest = file_sha256(path)
            cursor[key] = {"signature": signature, "sha256": digest}
            if seen.get("sha256") == digest:
                continue  # touched, same bytes
            events.append(
                AssetObservation(
                    asset_key=keys.prompt_tables,
                    partition=key,
                    tags={DATA_VERSION_TAG: digest},
                    metadata=dict(InputMetadata(input_sha256=digest)),
                )
            )
        for key in set(cursor) - set(scan.found):
            del cursor[key]  # gone: coming back, it is observed again
        return SensorResult(
            asset_events=events,
            dynamic_partitions_requests=(
                [partitions_def.build_add_request(new_keys)] if new_keys else []
            ),
            cursor=json.dumps(cursor, sort_keys=True),
        )

    return observation_sensor


def _load(raw: str | None) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def register_partitions_on_load(keys: Flux2Keys, storage: Flux2Storage) -> list[str] | None:
    """Add the input folder's new files as partitions of DAGSTER_HOME's instance, if set.

    Returns the keys added, or None when there is no configured instance (`dg check defs`
    without DAGSTER_HOME) or the folder or instance cannot be read: loading the code
    location never fails for it (a warning says why), the sensors register files later.
    """
    if not os.environ.get("DAGSTER_HOME"):
        return None
    try:
        with DagsterInstance.get() as instance:
            known = set(instance.get_dynamic_partitions(keys.partitions_name))
            scan = register_input_files(instance, keys, storage)
            return [key for key in scan.found if key not in known]
    except Exception as exc:  # loading the definitions must not depend on the folder
        logger.warning(
            "flux2: could not register the files of %s as partitions on load: %s",
            storage.input_dir,
            exc,
        )
        return None
