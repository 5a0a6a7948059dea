"""The input prompt tables: one dynamic partition per Parquet file, and the sensor.

A file `<key>.parquet` in the input folder is partition `<key>`. The sensor
registers new files as partitions and asks for a run of each new or changed file;
its run key holds the file's sha256 and how many times the file changed (see
`input_run_key`), so an unchanged file never runs twice, an edited one runs again, and
so does one changed back to content it had before (A, B, then A). Files that arrive
together, neighbours in the partitions' order, share ranged runs of up to
`partitions_per_run` (as the UI's backfills do): a folder of 100 new files is 4 runs,
not 100, each keyed by the versions of the files it covers (`ranged_run_key`).
A changed file whose partition a run not yet finished covers waits: the sensor asks for
its run once that run has ended, so two runs never race to write one partition's results
(an older run that ends after its input changed fails without writing, see
`flux2_pipeline.batch.freshness`), and the new version is not forgotten meanwhile.
`flux2-pipeline materialize` registers partitions with the same `register_input_files`.

Example::

    sensor = defs.get_sensor_def(Flux2Keys().sensor_name)
    result = sensor(build_sensor_context(instance=instance, resources={"flux2_storage": storage}))
"""

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetObservation,
    AssetsDefinition,
    AssetSpec,
    DagsterInstance,
    DagsterRunStatus,
    DataVersion,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    MetadataValue,
    ObserveResult,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    multi_observable_source_asset,
    sensor,
)

from flux2_pipeline.assets.keys import Flux2Keys
from flux2_pipeline.assets.metadata import InputMetadata
from flux2_pipeline.assets.ranges import (
    DEFAULT_PARTITIONS_PER_RUN,
    PARTITION_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    plan_runs,
)
from flux2_pipeline.batch import file_sha256
from flux2_pipeline.resources import Flux2Storage, InputScan

DATA_VERSION_TAG = "dagster/data_version"

UNFINISHED_RUN_STATUSES = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
    DagsterRunStatus.SUSPENDED,
]
"""Runs that may still write a partition's results (what the sensor waits for)."""
"""Dagster's tag for the data version an observation records."""


def new_partition_keys(instance: DagsterInstance, keys: Flux2Keys, scan: InputScan) -> list[str]:
    """The keys of input files not yet registered as partitions."""
    known = set(instance.get_dynamic_partitions(keys.partitions_name))
    return [key for key in scan.found if key not in known]


def register_input_files(
    instance: DagsterInstance, keys: Flux2Keys, storage: Flux2Storage
) -> InputScan:
    """Add a partition for every new input file now (what the sensor requests each tick)."""
    scan = storage.scan_inputs()
    new = new_partition_keys(instance, keys, scan)
    if new:
        instance.add_dynamic_partitions(keys.partitions_name, new)
    return scan


def build_prompt_tables(
    keys: Flux2Keys, partitions_def: DynamicPartitionsDefinition, group_name: str
) -> AssetsDefinition:
    """The observable prompt tables: one partition per input file, versioned by its sha256.

    An observation of one partition hashes its file; one of a range hashes each file of
    it, and one without a partition every file. The observation sensor
    (`build_observation_sensor`) records the same versions without a run.
    """

    # Dagster leaves this decorator unannotated; it returns an `AssetsDefinition`.
    @multi_observable_source_asset(  # type: ignore[untyped-decorator]
        name=keys.prompt_tables.to_python_identifier(),
        specs=[
            AssetSpec(
                keys.prompt_tables,
                group_name=group_name,
                kinds={"parquet"},
                # A range's observations are logged one per partition, with no result.
                skippable=True,
                description="Input prompt tables: one Parquet file per partition in "
                "FLUX2_INPUT_DIR. The data version of a partition is the sha256 of its file, "
                "so a changed file makes its flux2_edits partition stale.",
            )
        ],
        partitions_def=partitions_def,
        required_resource_keys={keys.resource("storage")},
    )
    def prompt_tables(
        context: AssetExecutionContext,
    ) -> Iterator[ObserveResult]:
        """Observe the input files' content hashes as their partitions' data versions."""
        storage: Flux2Storage = getattr(context.resources, keys.resource("storage"))
        if context.has_partition_key:
            path = storage.input_path(context.partition_key)
            yield ObserveResult(
                asset_key=keys.prompt_tables,
                data_version=DataVersion(file_sha256(path)),
                metadata=dict(InputMetadata(input_path=MetadataValue.path(str(path)))),
            )
            return
        found = storage.scan_inputs().found
        if context.has_partition_key_range:
            found = {key: found[key] for key in context.partition_keys if key in found}
        for key, path in found.items():
            # One observation per partition of the range: an `ObserveResult` names none.
            context.log_event(
                AssetObservation(
                    asset_key=keys.prompt_tables,
                    partition=key,
                    tags={DATA_VERSION_TAG: file_sha256(path)},
                    metadata=dict(InputMetadata(input_path=MetadataValue.path(str(path)))),
                )
            )

    assert isinstance(prompt_tables, AssetsDefinition)
    return prompt_tables


def input_run_key(key: str, sha256: str, version: int) -> str:
    """The run key of one version of one input file: its content hash and change count.

    The daemon never launches a run key twice, so the hash alone would keep a file that
    changes back to earlier content (A, then B, then A again) from ever running a third
    time, leaving B's results in place. Counting the changes (in the sensor's cursor) makes
    each new content its own run; the first version keeps the plain `<key>:<sha256>`.

    >>> input_run_key("cats", "ab12", 1), input_run_key("cats", "ab12", 3)
    ('cats:ab12', 'cats:ab12:v3')
    """
    return f"{key}:{sha256}" if version <= 1 else f"{key}:{sha256}:v{version}"


def ranged_run_key(first: str, last: str, file_run_keys: Sequence[str]) -> str:
    """The run key of a run over several files: its range and a hash of their run keys.

    Any file of the range changing gives the range a new key, as `input_run_key` does for
    one file; the same versions of the same files never run twice.

    >>> ranged_run_key("a", "c", ["a:11", "b:22", "c:33"])
    'a..c:894a5f63b7175eab'
    """
    digest = hashlib.sha256("\n".join(file_run_keys).encode()).hexdigest()[:16]
    return f"{first}..{last}:{digest}"


def busy_partitions(
    instance: DagsterInstance, keys: Flux2Keys, order: Sequence[str]
) -> dict[str, str]:
    """The partitions that a run not yet finished (queued or running) covers, with its id.

    Only runs that materialize the edits asset count; a ranged run covers its whole range
    in the partitions' `order`.
    """
    position = {key: index for index, key in enumerate(order)}
    busy: dict[str, str] = {}
    for run in instance.get_runs(filters=RunsFilter(statuses=UNFINISHED_RUN_STATUSES)):
        if run.asset_selection is not None and keys.edits not in run.asset_selection:
            continue
        for key in _run_partitions(run.tags, order, position):
            busy.setdefault(key, run.run_id)
    return busy


def _run_partitions(
    tags: Mapping[str, str], order: Sequence[str], position: Mapping[str, int]
) -> Sequence[str]:
    if PARTITION_TAG in tags:
        return [tags[PARTITION_TAG]]
    first = position.get(tags.get(RANGE_START_TAG, ""))
    last = position.get(tags.get(RANGE_END_TAG, ""))
    if first is None or last is None:
        return []
    return order[first : last + 1]


def _load_cursor(raw: str | None) -> dict[str, dict[str, Any]]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def build_prompt_files_sensor(
    keys: Flux2Keys,
    partitions_def: DynamicPartitionsDefinition,
    asset_selection: Sequence[AssetKey],
    partitions_per_run: int = DEFAULT_PARTITIONS_PER_RUN,
) -> SensorDefinition:
    """The sensor that turns new or changed input files into partitions and runs."""

    @sensor(
        name=keys.sensor_name,
        asset_selection=list(asset_selection),
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.STOPPED,
        required_resource_keys={keys.resource("storage")},
        description="Registers each Parquet file in FLUX2_INPUT_DIR as a partition and "
        "requests runs of the new or changed files, up to "
        f"{partitions_per_run} neighbouring files a run.",
    )
    def prompt_files_sensor(context: SensorEvaluationContext, **_given: Any) -> SensorResult:
        """New file: add a partition and a run. Changed file: a run. Unchanged: nothing."""
        # The daemon hands `required_resource_keys` over on the context only; a direct call
        # (`sensor(context)`) passes them as keyword arguments too, which `_given` absorbs.
        storage: Flux2Storage = getattr(context.resources, keys.resource("storage"))
        scan = storage.scan_inputs()
        for line in scan.skipped_lines():
            context.log.warning(line)
        new_keys = new_partition_keys(context.instance, keys, scan)
        order = [*context.instance.get_dynamic_partitions(keys.partitions_name), *new_keys]
        known = set(order) - set(new_keys)
        cursor = _load_cursor(context.cursor)
        busy = busy_partitions(context.instance, keys, order) if known else {}
        changed: dict[str, tuple[str, int]] = {}
        for key, path in scan.found.items():
            signature = scan.signatures.get(key)
            seen = cursor.get(key, {})
            if signature is not None and seen.get("signature") == signature and key in known:
                continue  # same size and mtime (or object version): skip hashing it again
            digest = file_sha256(path)
            unchanged = seen.get("sha256") == digest and key in known
            if not unchanged and key in busy:
                # The cursor keeps the version before: the next tick after that run sees
                # the change again and asks for its run then.
                context.log.info(
                    f"{key}: changed (sha256 {digest[:12]}); its run is requested once run "
                    f"{busy[key]}, which covers this partition, has ended"
                )
                continue
            # New content for a file already seen is a new version, with a run key of its own.
            version = int(seen.get("version", 1)) + ("sha256" in seen and not unchanged)
            cursor[key] = {"signature": signature, "sha256": digest, "version": version}
            if not unchanged:
                changed[key] = (digest, version)
        for key, seen in list(cursor.items()):
            if key not in scan.found and "sha256" in seen:
                # Gone: forget the content, keep the count, so the file coming back (even
                # with content it had before) is a new version with a run key of its own.
                cursor[key] = {"version": int(seen.get("version", 1)) + 1}
        run_requests = [
            _run_request(run, changed)
            for run in plan_runs(list(changed), order, partitions_per_run)
        ]
        return SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=(
                [partitions_def.build_add_request(new_keys)] if new_keys else []
            ),
            cursor=json.dumps(cursor, sort_keys=True),
        )

    return prompt_files_sensor


def _run_request(run: Sequence[str], changed: dict[str, tuple[str, int]]) -> RunRequest:
    """One file: a run of its partition. Several: a run of their range (Dagster's tags)."""
    if len(run) == 1:
        [key] = run
        digest, version = changed[key]
        return RunRequest(
            run_key=input_run_key(key, digest, version),
            partition_key=key,
            tags={"flux2/input_sha256": digest},
        )
    file_keys = [input_run_key(key, *changed[key]) for key in run]
    return RunRequest(
        run_key=ranged_run_key(run[0], run[-1], file_keys),
        tags={
            RANGE_START_TAG: run[0],
            RANGE_END_TAG: run[-1],
            "flux2/input_files": str(len(run)),
        },
    )
