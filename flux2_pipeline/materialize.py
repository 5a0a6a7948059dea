"""Materialize partitions through the project's `Definitions`, in runs over ranges of them.

This is what `flux2-pipeline materialize` and the demo call. It registers input files as
partitions with the sensor's own code, resolves asset names against the `Definitions`,
groups the selected partitions into runs (`plan_runs`: contiguous ranges of up to
`Settings.partitions_per_run`, FLUX2_PARTITIONS_PER_RUN, as the UI's backfills do), and
summarizes every partition from its materialization and failure metadata. Several runs go
at once (`Settings.parallel_partitions`, FLUX2_PARALLEL_PARTITIONS), each in a worker
process. Threads would not do: Dagster's SQLite storages deadlock when several runs
execute in one process. When a partition of a range fails, the steps after it are skipped
for the whole range; the partitions whose own steps succeeded then get those steps in
runs of their own (`_run_skipped_steps`).

The instance is DAGSTER_HOME's, or one kept under a local output folder (or
`~/.flux2-pipeline/dagster/<digest of the URI>` for an object-store output); its first-time
setup is serialized by a file lock, so two commands on a new folder both work.

Example::

    report = materialize(Settings.from_env(), partitions=["cats"])
    print(format_report(report))
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait as connection_wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from dagster import (
    AssetKey,
    AssetPartitionStatus,
    DagsterEventType,
    DagsterInstance,
    Definitions,
    EventLogEntry,
    ExecuteInProcessResult,
    JobDefinition,
)
from dagster_shared.error import SerializableErrorInfo
from filelock import FileLock

from flux2_pipeline.assets import Flux2Keys, register_input_files
from flux2_pipeline.assets.metadata import (
    DatasetMetadata,
    EditsMetadata,
    EditsProgress,
    ImagesMetadata,
    StepFailureMetadata,
)
from flux2_pipeline.assets.ranges import RANGE_END_TAG, RANGE_START_TAG, plan_runs
from flux2_pipeline.ledger import Ledger
from flux2_pipeline.paths import is_local, local_path
from flux2_pipeline.resources import Flux2Storage, InputScan
from flux2_pipeline.settings import Settings, SettingsError
from flux2_pipeline.workers import (
    Channel,
    StartGate,
    server_alive,
    start_worker_server,
    tell_stop,
    watch_command,
)

logger = logging.getLogger(__name__)

RUN_TAG = "flux2/launched_by"
REMOTE_OUTPUT_HOMES = Path("~/.flux2-pipeline/dagster")
"""Where Dagster instances live when FLUX2_OUTPUT_DIR is an object store (one per URI)."""
PROGRESS_POLL_SECONDS = 0.5

Progress = Callable[[str, Mapping[str, Any]], None]
"""Called with a partition key and its latest progress metadata (rows done, failed, cost)."""


@dataclass(frozen=True)
class PartitionSummary:
    """How one partition's run went, from its materialization or failure metadata."""

    partition: str
    succeeded: bool
    seconds: float
    rows: int = 0
    completed: int = 0
    failed: int = 0
    invalid: int = 0
    cancelled: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    results_path: str | None = None
    images: int = 0
    images_failed: int = 0
    interrupted: bool = False
    blocked: bool = False
    """Its own steps succeeded, but another partition of its run failed, which skipped the
    steps after them (checks, later assets); `materialize` runs those again for it."""
    skipped_assets: tuple[str, ...] = ()
    """The selected assets the blocked partition was not materialized for."""


@dataclass(frozen=True)
class DatasetSummary:
    """How the (unpartitioned) training dataset's run went."""

    succeeded: bool
    seconds: float
    rows: int = 0
    shards: int = 0
    path: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class MaterializeReport:
    """Every partition's summary, the training dataset's when it ran, and skipped files."""

    partitions: list[PartitionSummary]
    dataset: DatasetSummary | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        """True when the user stopped the command (the remaining partitions did not start)."""
        return any(s.interrupted for s in self.partitions)

    @property
    def succeeded(self) -> bool:
        """True when every run succeeded and no input file was skipped."""
        runs_ok = all(s.succeeded for s in self.partitions)
        return runs_ok and not self.skipped and (self.dataset is None or self.dataset.succeeded)


def default_dagster_home(settings: Settings) -> Path:
    """The Dagster instance folder used when DAGSTER_HOME is unset.

    `<output>/.dagster` for a local output folder. Run history is local state (SQLite),
    so for an object-store output it is `~/.flux2-pipeline/dagster/<sha256(URI)[:12]>`:
    one instance per output URI on this machine.
    """
    output = settings.storage.output_root()
    if is_local(output):
        return local_path(output) / ".dagster"
    digest = hashlib.sha256(str(output).encode()).hexdigest()[:12]
    return REMOTE_OUTPUT_HOMES.expanduser() / digest


def open_instance(settings: Settings) -> DagsterInstance:
    """DAGSTER_HOME's instance, or a persistent one at `default_dagster_home`.

    Creating an instance's SQLite storages is not safe from two processes at once (both
    run Alembic); a lock file in the folder makes the second wait for the first.
    """
    home = settings.dagster_home or default_dagster_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / ".flux2-setup.lock"):
        config = home / "dagster.yaml"
        if settings.dagster_home is None and not config.exists():
            config.write_text("telemetry:\n  enabled: false\n")
        # Dagster warns on stderr when dagster.yaml is absent; its defaults are what we want.
        dagster_logger = logging.getLogger("dagster")
        level = dagster_logger.level
        dagster_logger.setLevel(logging.ERROR)
        try:
            instance = DagsterInstance.from_config(str(home))
        finally:
            dagster_logger.setLevel(level)
        # Touch every storage while holding the lock, so each is created and stamped once.
        instance.get_runs(limit=1)
        instance.get_dynamic_partitions("flux2_setup_probe")
        instance.all_instigator_state()
        return instance


def failed_partitions(
    instance: DagsterInstance, defs: Definitions, keys: Sequence[str], assets: Sequence[AssetKey]
) -> list[str]:
    """The partitions that a run left unfinished: failed, or done for some of `assets` only.

    A partition is unfinished when any of the assets failed on it, or when one asset has
    it materialized and another not (a ranged run whose step failed for a neighbour
    skips the steps after it for the whole range).
    """
    graph = defs.resolve_asset_graph()
    statuses = []
    for asset in assets:
        partitions_def = graph.get(asset).partitions_def
        assert partitions_def is not None, "only partitioned assets have failed partitions"
        statuses.append(instance.get_status_by_partition(asset, keys, partitions_def) or {})
    unfinished = []
    for key in keys:
        seen = [status.get(key) for status in statuses]
        if AssetPartitionStatus.FAILED in seen or (
            AssetPartitionStatus.MATERIALIZED in seen and None in seen
        ):
            unfinished.append(key)
    return unfinished


@dataclass(frozen=True)
class _Selection:
    partitioned: list[AssetKey]
    unpartitioned: list[AssetKey]
    explicit: bool


def _input_file_count(storage: Flux2Storage) -> int:
    """How many tables the input folder holds, without reading any (a guess at the runs)."""
    if storage.input_is_remote:
        return len(storage.scan_inputs().found)  # one listing call
    return sum(1 for _ in Path(storage.input_dir).glob("*.parquet"))


def _select(defs: Definitions, names: Sequence[str]) -> _Selection:
    graph = defs.resolve_asset_graph()
    materializable = {
        key.to_user_string(): key
        for key in graph.get_all_asset_keys()
        if graph.get(key).is_materializable
    }
    unknown = [name for name in names if name not in materializable]
    if unknown:
        raise SettingsError(
            f"--select: unknown asset {unknown[0]!r} (choose from {', '.join(materializable)})"
        )
    chosen = [materializable[name] for name in (names or materializable)]
    ordered = [key for key in graph.toposorted_asset_keys if key in chosen]
    return _Selection(
        partitioned=[k for k in ordered if graph.get(k).partitions_def is not None],
        unpartitioned=[k for k in ordered if graph.get(k).partitions_def is None],
        explicit=bool(names),
    )


def materialize_partitions(settings: Settings, **options: Any) -> list[PartitionSummary]:
    """`materialize(settings, **options).partitions`."""
    return materialize(settings, **options).partitions


def materialize(
    settings: Settings,
    *,
    partitions: Sequence[str] = (),
    select: Sequence[str] = (),
    retry_failed: bool = False,
    instance: DagsterInstance | None = None,
    log_level: str = "INFO",
    progress: Progress | None = None,
    parallel: int | None = None,
) -> MaterializeReport:
    """Run the selected partitioned assets over ranges of partitions, then the rest once.

    Each run covers up to `settings.partitions_per_run` partitions; up to `parallel`
    (default `settings.parallel_partitions`) runs go at once, in worker processes; 1 runs
    them one after another in this process. The training dataset runs when it is
    selected (the default selects every asset) and either it was named in `select` or at
    least one partition ran. A stop (Ctrl+C, SIGTERM) ends the running partitions cleanly
    and starts no other run; the report says so. Raises `SettingsError` for an unknown
    partition or asset name.

    Example::

        report = materialize(settings, select=["flux2_images"], partitions=["cats"])
    """
    settings.runcomfy.check_token()
    storage = settings.storage
    problem = storage.input_dir_problem()
    if problem:
        raise SettingsError(f"FLUX2_INPUT_DIR must be a folder of Parquet files; {problem}")
    parallel = settings.parallel_partitions if parallel is None else parallel
    files = len(partitions) or _input_file_count(storage)
    if min(parallel, -(-files // settings.partitions_per_run)) > 1:
        # Started now, the server imports Dagster while this process scans the inputs.
        parallel = _worker_server_or_one(parallel)
    defs = settings.definitions()
    selection = _select(defs, select)
    instance = instance or open_instance(settings)
    scan = register_input_files(instance, Flux2Keys(), storage)
    for key in partitions:
        if f"{key}.parquet" in scan.skipped:
            raise SettingsError(
                f"--partition: {key}.parquet cannot be a partition: its name "
                f"{scan.skipped[f'{key}.parquet']}; rename the file"
            )
        if key not in scan.found:
            raise SettingsError(f"--partition: no input file {key}.parquet in {storage.input_dir}")
    chosen = list(partitions) or list(scan.found)
    if retry_failed and selection.partitioned:
        chosen = failed_partitions(instance, defs, chosen, selection.partitioned)
    job = defs.resolve_implicit_global_asset_job_def()
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    keys = chosen if selection.partitioned else []
    order = instance.get_dynamic_partitions(Flux2Keys().partitions_name)
    runs = plan_runs(keys, order, settings.partitions_per_run)
    workers = min(parallel, len(runs))
    if workers > 1:
        workers = _worker_server_or_one(workers)
    watcher = _ProgressWatcher(instance, progress) if progress is not None else None
    try:
        if workers > 1 and not instance.is_ephemeral:
            summaries = _run_in_workers(
                settings, instance, runs, selection.partitioned, run_config, watcher, workers
            )
        else:
            summaries = _run_one_by_one(
                job, instance, runs, selection.partitioned, run_config, watcher
            )
        summaries = _run_skipped_steps(
            job, instance, summaries, selection.partitioned, order, settings, run_config
        )
    finally:
        if watcher is not None:
            watcher.stop()
    dataset = None
    wants_dataset = selection.unpartitioned and (selection.explicit or summaries)
    if wants_dataset and not any(s.interrupted for s in summaries):
        dataset = _run_dataset(job, instance, selection.unpartitioned, run_config)
    skipped = {} if partitions else scan.skipped
    return MaterializeReport(summaries, dataset, skipped)


def run_partition(
    job: JobDefinition,
    instance: DagsterInstance,
    key: str,
    assets: Sequence[AssetKey],
    *,
    run_config: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    progress: Progress | None = None,
) -> PartitionSummary:
    """One run of `assets` for partition `key`, summarized; an interrupt is a result too.

    Example::

        job = defs.resolve_implicit_global_asset_job_def()
        summary = run_partition(job, instance, "cats", [Flux2Keys().edits])
    """
    [summary] = run_partitions(
        job, instance, [key], assets, run_config=run_config, run_id=run_id, progress=progress
    )
    return summary


def run_partitions(
    job: JobDefinition,
    instance: DagsterInstance,
    keys: Sequence[str],
    assets: Sequence[AssetKey],
    *,
    run_config: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    progress: Progress | None = None,
    subset: bool = False,
) -> list[PartitionSummary]:
    """One run of `assets` over `keys`, summarized per partition.

    `keys` is one partition, or a range: contiguous in the partitions' order, first to
    last (see `plan_runs`). Each partition gets its own materializations or failure.
    `subset`: `job` is already the subset to run (`JobDefinition.get_subset`), and
    `assets` only what it materializes.

    Example::

        summaries = run_partitions(job, instance, ["cats", "dogs"], [Flux2Keys().edits])
    """
    started = time.monotonic()
    run_id = run_id or str(uuid.uuid4())
    watcher = _ProgressWatcher(instance, progress) if progress is not None else None
    if watcher is not None:
        watcher.follow({run_id: keys[0]})
    tags = {RUN_TAG: "flux2-pipeline materialize"}
    if len(keys) > 1:
        tags[RANGE_START_TAG] = keys[0]
        tags[RANGE_END_TAG] = keys[-1]
    try:
        with sigterm_kept():
            result = job.execute_in_process(
                instance=instance,
                partition_key=keys[0] if len(keys) == 1 else None,
                asset_selection=None if subset else list(assets),
                raise_on_error=False,
                run_config=dict(run_config or {}),
                run_id=run_id,
                tags=tags,
            )
    except KeyboardInterrupt:
        seconds = time.monotonic() - started
        return [
            PartitionSummary(key, False, seconds, error="stopped", interrupted=True) for key in keys
        ]
    finally:
        if watcher is not None:
            watcher.stop()
    summaries = _summarize(keys, assets, result, time.monotonic() - started)
    if watcher is not None:
        for summary in summaries:
            watcher.finished(summary)
    return summaries


def _run_skipped_steps(
    job: JobDefinition,
    instance: DagsterInstance,
    summaries: list[PartitionSummary],
    selected: Sequence[AssetKey],
    order: Sequence[str],
    settings: Settings,
    run_config: Mapping[str, Any],
) -> list[PartitionSummary]:
    """Run again, for the partitions that need it, the steps a neighbour's failure skipped.

    In a run over a range, a partition that fails stops the steps after it (the checks,
    flux2_images after flux2_edits) for every partition of the range. Those partitions'
    own steps succeeded, so the skipped ones run now, in runs of their own: the assets
    they miss, and the checks of every selected asset but those its own step evaluated.
    """
    if any(summary.interrupted for summary in summaries):
        return summaries
    waiting: dict[tuple[str, ...], list[str]] = {}
    for summary in summaries:
        if summary.blocked:
            waiting.setdefault(summary.skipped_assets, []).append(summary.partition)
    graph = job.asset_layer.asset_graph
    later: dict[str, PartitionSummary] = {}
    for names, keys in waiting.items():
        assets = [AssetKey.from_user_string(name) for name in names]
        # A check evaluated in its asset's own step (flux2_edits') already ran with it.
        checks = {
            check
            for check in graph.get_check_keys_for_assets(set(selected))
            if check.asset_key in assets
            or check not in graph.get(check.asset_key).assets_def.check_keys
        }
        steps = job.get_subset(asset_selection=set(assets), asset_check_selection=checks)
        for run in plan_runs(keys, order, settings.partitions_per_run):
            for summary in run_partitions(
                steps, instance, run, assets, run_config=run_config, subset=True
            ):
                later[summary.partition] = summary
    return [_merged(summary, later.get(summary.partition)) for summary in summaries]


def _merged(first: PartitionSummary, later: PartitionSummary | None) -> PartitionSummary:
    """A partition's own steps' figures, with those of its steps that ran later."""
    if later is None:
        return first
    return replace(
        first,
        succeeded=later.succeeded,
        seconds=first.seconds + later.seconds,
        error=later.error,
        images=later.images,
        images_failed=later.images_failed,
        interrupted=later.interrupted,
        blocked=later.blocked,
        skipped_assets=later.skipped_assets,
    )


def _run_one_by_one(
    job: JobDefinition,
    instance: DagsterInstance,
    runs: Sequence[Sequence[str]],
    assets: Sequence[AssetKey],
    run_config: Mapping[str, Any],
    watcher: _ProgressWatcher | None,
) -> list[PartitionSummary]:
    summaries: list[PartitionSummary] = []
    for keys in runs:
        run_id = str(uuid.uuid4())
        if watcher is not None:
            watcher.follow({run_id: keys[0]})
        done = run_partitions(job, instance, keys, assets, run_config=run_config, run_id=run_id)
        if watcher is not None:
            for summary in done:
                watcher.finished(summary)
        summaries.extend(done)
        if any(summary.interrupted for summary in done):
            break
    return summaries


def _run_in_workers(
    settings: Settings,
    instance: DagsterInstance,
    runs: Sequence[Sequence[str]],
    assets: Sequence[AssetKey],
    run_config: Mapping[str, Any],
    watcher: _ProgressWatcher | None,
    workers: int,
) -> list[PartitionSummary]:
    """Up to `workers` runs at once, in order, each in a worker process of its own.

    The processes fork from a server that has imported this module once (see
    `flux2_pipeline.workers`), so each starts in milliseconds rather than re-importing
    Dagster. A worker that dies fails its own run's partitions alone (reported from what
    the instance and the ledger hold) and the next run starts in a new one. A stop (Ctrl+C,
    SIGTERM) tells each worker to interrupt its run (Dagster's clean stop: queued jobs
    cancelled) and starts no other; runs not yet started are dropped from the report. A
    worker server that dies stops the runs the same way (a part of the command was
    killed: it pays for nothing more), and the runs it never started are reported as
    such. Either way this returns only once every worker has ended; a worker whose
    command dies stops on its own (`workers.watch_command`).
    """
    context = start_worker_server()
    setup = _WorkerSetup(
        settings, instance.get_ref(), dict(os.environ), list(warnings.filters), StartGate(context)
    )
    run_ids = [str(uuid.uuid4()) for _ in runs]
    waiting = deque(range(len(runs)))
    running: dict[Channel, _Running] = {}
    results: dict[str, PartitionSummary] = {}
    server_lost = stopping = False

    def start(index: int) -> None:
        mine, theirs = context.Pipe()
        args = (setup, theirs, list(runs[index]), run_ids[index], list(assets), dict(run_config))
        process = context.Process(target=_worker_main, args=args, name=f"flux2-run-{index}")
        try:
            process.start()
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()  # the worker's end lives in the worker alone: its death is our EOF
        running[mine] = _Running(index, process, mine, time.monotonic())

    def keep(entry: _Running) -> None:
        keys = runs[entry.index]
        summaries = _run_outcome(settings, instance, keys, run_ids[entry.index], assets, entry)
        if not summaries and server_lost:  # stopped before it started
            summaries = list(_not_started(keys).values())
        for summary in summaries:
            results[summary.partition] = summary
            if watcher is not None:
                watcher.finished(summary)

    with _stop_requests() as stop:
        try:
            while waiting or running:
                if not (stop.is_set() or server_lost):
                    server_lost = _start_waiting(start, waiting, running, workers)
                if (stop.is_set() or server_lost) and not stopping:
                    stopping = True
                    for entry in running.values():
                        tell_stop(entry.channel)
                if stopping and waiting:
                    if server_lost:
                        for index in waiting:
                            results.update(_not_started(runs[index]))
                    waiting.clear()
                watched: list[Any] = list(running)
                if not server_lost:
                    watched += [entry.process.sentinel for entry in running.values()]
                ready = connection_wait(watched, PROGRESS_POLL_SECONDS) if watched else []
                for channel in [item for item in ready if isinstance(item, Channel)]:
                    entry = running[channel]
                    if _read(entry):
                        del running[channel]
                        keep(entry)
                if not server_lost and (_orphaned(ready, running) or not server_alive()):
                    server_lost = True
                    logger.error(
                        "the worker server died: stopping the running runs, starting no other"
                    )
                if watcher is not None:
                    watcher.follow({run_ids[e.index]: runs[e.index][0] for e in running.values()})
        finally:
            _wait_for_all(running)
    return [results[key] for keys in runs for key in keys if key in results]


def _start_waiting(
    start: Callable[[int], None],
    waiting: deque[int],
    running: Mapping[Channel, _Running],
    workers: int,
) -> bool:
    """Start the next runs while places are free; True when the worker server is gone.

    A server found dead is not restarted (multiprocessing would start a new one): a part
    of the command was killed, and a new run would pay for jobs nobody is watching over.
    """
    while waiting and len(running) < workers:
        if not server_alive():
            logger.error("the worker server died: starting no other run")
            return True
        try:
            start(waiting[0])
        except (OSError, EOFError) as exc:  # the server died between the check and the fork
            logger.error(f"the worker server cannot start a run ({exc!r}): starting no other")
            return True
        waiting.popleft()
    return False


def _orphaned(ready: Sequence[Any], running: Mapping[Channel, _Running]) -> bool:
    """Whether a worker's exit status came while it still runs: its server has died.

    The server reports each worker's exit on the worker's sentinel, and a server that
    dies makes every sentinel readable at once; a worker that really ended has closed
    its pipe first (end-of-file, read above).
    """
    return any(
        entry.process.sentinel in ready and not entry.channel.poll(0) for entry in running.values()
    )


def _wait_for_all(running: dict[Channel, _Running]) -> None:
    """Stop and outwait the workers still running (the command never leaves one behind)."""
    for entry in running.values():
        tell_stop(entry.channel)
    for channel in list(running):
        with contextlib.suppress(EOFError, OSError):
            while True:
                channel.recv()
        channel.close()
        del running[channel]


@dataclass
class _Running:
    """A run's worker process and the command's end of its pipe."""

    index: int
    process: BaseProcess
    channel: Channel
    started: float
    outcome: tuple[list[PartitionSummary] | None, str | None] | None = None
    """What the worker sent: its summaries (None: stopped before it started) or an error."""


def _read(entry: _Running) -> bool:
    """Take what the worker sent; True once it has ended (end-of-file on its pipe)."""
    try:
        entry.outcome = entry.channel.recv()
    except (EOFError, OSError):
        entry.channel.close()
        entry.process.join(timeout=1.0)  # its exit status, when the server is still there
        return True
    return False


def _run_outcome(
    settings: Settings,
    instance: DagsterInstance,
    keys: Sequence[str],
    run_id: str,
    assets: Sequence[AssetKey],
    entry: _Running,
) -> list[PartitionSummary]:
    """A run's summaries: the worker's own, or what the instance and ledger say it did."""
    if entry.outcome is None:
        seconds = time.monotonic() - entry.started
        how = _exit_status(entry.process.exitcode)
        death = f"its worker process died ({how}) before the run ended"
        return _dead_run(settings, instance, keys, run_id, assets, death, seconds)
    summaries, error = entry.outcome
    if error is not None:
        failure = f"its worker process failed: {error}"
        return [PartitionSummary(key, False, 0.0, error=failure) for key in keys]
    return summaries or []


def _exit_status(code: int | None) -> str:
    """How a worker process ended, in words ("killed by SIGKILL").

    >>> _exit_status(-9)
    'killed by SIGKILL'
    """
    if code is None or code == 255:  # 255: the server that would know is gone too
        return "exit status unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _dead_run(
    settings: Settings,
    instance: DagsterInstance,
    keys: Sequence[str],
    run_id: str,
    assets: Sequence[AssetKey],
    error: str,
    seconds: float,
) -> list[PartitionSummary]:
    """The partitions of a run whose worker died, from the instance and the ledger.

    A partition the run materialized for every selected asset succeeded (its
    materialization's figures); any other failed, with the rows its ledger holds as
    completed. The run itself is marked failed, so the UI does not show it running.
    """
    materialized: dict[str, set[AssetKey]] = {key: set() for key in keys}
    figures: dict[str, dict[str, Any]] = {key: {} for key in keys}
    only = keys[0] if len(keys) == 1 else None
    try:
        records = instance.get_records_for_run(
            run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
        ).records
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            instance.report_run_failed(run, message=f"flux2-pipeline materialize: {error}")
    except Exception as exc:  # the instance is not what the worker left: report as failed
        logger.warning(f"cannot read run {run_id} of a dead worker: {exc!r}")
        records = []
    for record in records:
        materialization = record.asset_materialization
        key = (materialization.partition if materialization else None) or only
        if materialization is not None and key in figures:
            figures[key].update({k: v.value for k, v in materialization.metadata.items()})
            materialized[key].add(materialization.asset_key)
    completed = _ledger_completed(settings, [k for k in keys if materialized[k] < set(assets)])
    summaries = []
    for key in keys:
        if materialized[key] >= set(assets):
            summaries.append(_summary(key, figures[key], True, None, seconds))
        else:
            done = completed.get(key, 0)
            summaries.append(
                PartitionSummary(key, False, seconds, rows=done, completed=done, error=error)
            )
    return summaries


def _ledger_completed(settings: Settings, keys: Sequence[str]) -> dict[str, int]:
    """Each partition's completed rows in the ledger (empty when it cannot be read)."""
    if not keys:
        return {}
    try:
        with Ledger.open(settings.ledger.effective_url) as ledger:
            return {key: ledger.stats(key)["completed"] for key in keys}
    except Exception as exc:  # a report without the figures beats no report
        logger.warning(f"cannot read the ledger for a dead worker's partitions: {exc!r}")
        return {}


def _not_started(keys: Sequence[str]) -> dict[str, PartitionSummary]:
    error = "not started: the worker server died"
    return {key: PartitionSummary(key, False, 0.0, error=error, interrupted=True) for key in keys}


def _worker_server_or_one(workers: int) -> int:
    """`workers` once the worker server runs; 1 (with a warning) if it cannot start."""
    try:
        start_worker_server()
    except OSError as exc:  # e.g. the server was killed and reaped by someone else
        logger.warning(f"no worker processes ({exc}); runs go one after another")
        return 1
    return workers


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """SIGTERM's handler as it was before a Dagster run in this process, once it has ended.

    A run copies SIGINT's handler to SIGTERM as it ends (`setup_interrupt_handlers`). In a
    command started in the background from a script, SIGINT is ignored: after its first
    run it would ignore SIGTERM too, and could not be stopped between runs.

    Example::

        with sigterm_kept():
            job.execute_in_process(instance=instance)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """An event set by SIGTERM (what `kill` and orchestrators send) and by Ctrl+C.

    SIGINT is left alone when it is ignored (a command started in the background from a
    script): the shell's choice stands. Off the main thread no handler can be set, and
    the event is never set.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def note(_signal: int, _frame: FrameType | None) -> None:
        stop.set()

    signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signals.append(signal.SIGINT)
    previous = {number: signal.signal(number, note) for number in signals}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@dataclass(frozen=True)
class _WorkerSetup:
    """What a worker process needs besides its run: the command's settings and state."""

    settings: Settings
    instance_ref: Any  # `DagsterInstance.get_ref()`'s value; Dagster exports no name for it
    environ: dict[str, str]
    warning_filters: list[Any]
    gate: StartGate


@dataclass
class _Worker:
    job: JobDefinition
    instance: DagsterInstance
    stopping: threading.Event
    gate: StartGate


_worker: _Worker | None = None
"""The worker process's job and instance, made once by `_worker_start`."""


def _worker_main(
    setup: _WorkerSetup,
    channel: Channel,
    keys: list[str],
    run_id: str,
    assets: list[AssetKey],
    run_config: dict[str, Any],
) -> None:
    """A worker process's life: one run, its summaries sent to the command, then exit."""
    outcome: tuple[list[PartitionSummary] | None, str | None]
    try:
        _worker_start(setup, channel)
        outcome = (_worker_run(keys, run_id, assets, run_config), None)
    except BaseException as exc:  # the command fails this run alone
        outcome = (None, innermost_line(exc))
    with contextlib.suppress(OSError):
        channel.send(outcome)
    # Nothing to tear down (the instance's writes are committed): exit without walking
    # Dagster's objects, which would hold the command's wait for nothing.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os._exit(0)


def innermost_line(exc: BaseException) -> str:
    """`ClassName: message` of an exception, on one line.

    >>> innermost_line(ValueError("bad\\nvalue"))
    'ValueError: bad'
    """
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _worker_start(setup: _WorkerSetup, channel: Channel) -> None:
    global _worker
    # The server the workers fork from started with the environment of its time, and
    # without the warning filters the command set up (Dagster's beta notices stay quiet).
    os.environ.clear()
    os.environ.update(setup.environ)
    for action, message, category, module, line in reversed(setup.warning_filters):
        warnings.filterwarnings(action, _pattern(message), category, _pattern(module), line)
    # Ctrl+C at the terminal reaches the command alone; it stops the workers through their
    # pipes, so a run is never interrupted twice (a second interrupt would cut its cleanup
    # short).
    os.setpgrp()
    stopping = threading.Event()

    def note_stop(_signal: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, note_stop)
    signal.signal(signal.SIGTERM, note_stop)

    def relay() -> None:
        stopping.set()
        # Dagster's handler stops a run in progress; before the run has installed it, the
        # interrupt would only reach `note_stop`, and a run that checked `stopping` just
        # before would go on paying. So wait for Dagster's handler, or for the end.
        while signal.getsignal(signal.SIGINT) is note_stop:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    watch_command(channel, on_stop=lambda: threading.Thread(target=relay, daemon=True).start())
    job = setup.settings.definitions().resolve_implicit_global_asset_job_def()
    instance = DagsterInstance.from_ref(setup.instance_ref)
    _worker = _Worker(job, instance, stopping, setup.gate)


def _pattern(text: re.Pattern[str] | str | None) -> str:
    """A warning filter's message or module as the text `filterwarnings` takes."""
    if isinstance(text, re.Pattern):
        return text.pattern
    return text or ""


def _worker_run(
    keys: list[str], run_id: str, assets: list[AssetKey], run_config: dict[str, Any]
) -> list[PartitionSummary] | None:
    worker = _worker
    assert worker is not None, "_worker_start runs first"
    with worker.gate.held(cancel=worker.stopping) as passed:
        if worker.stopping.is_set():
            # Stopped before it started or while it waited at the gate (a stop ends that
            # wait at once): never started.
            return None
        worker.instance.add_event_listener(run_id, _on_step_start(passed))
        return run_partitions(
            worker.job, worker.instance, keys, assets, run_config=run_config, run_id=run_id
        )


def _on_step_start(call: Callable[[], None]) -> Callable[[EventLogEntry], None]:
    """An event listener that calls `call` when the run's step starts."""

    def listen(event: EventLogEntry) -> None:
        if event.dagster_event_type == DagsterEventType.STEP_START:
            call()

    return listen


class _ProgressWatcher:
    """Follows runs' progress observations from the event log, on a thread of its own."""

    def __init__(self, instance: DagsterInstance, progress: Progress) -> None:
        self._instance = instance
        self._progress = progress
        self._lock = threading.Lock()
        self._runs: dict[str, str] = {}
        self._cursors: dict[str, str | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="flux2-progress", daemon=True)
        self._thread.start()

    def follow(self, runs: Mapping[str, str]) -> None:
        """Follow these runs (run id -> first partition) from now on, and only these."""
        with self._lock:
            self._runs = dict(runs)

    def finished(self, summary: PartitionSummary) -> None:
        """Report a partition's final figures (its run's last observation may be older)."""
        if summary.rows:
            self._progress(
                summary.partition,
                dict(
                    EditsProgress(
                        rows_total=summary.rows,
                        rows_done=summary.rows,
                        rows_failed=summary.failed + summary.cancelled,
                        cost_usd=summary.cost_usd,
                        seconds=summary.seconds,
                    )
                ),
            )

    def _follow(self) -> None:
        while not self._stop.wait(PROGRESS_POLL_SECONDS):
            with self._lock:
                runs = dict(self._runs)
            for run_id, partition in runs.items():
                self._read(run_id, partition)

    def _read(self, run_id: str, partition: str) -> None:
        try:
            page = self._instance.get_records_for_run(
                run_id,
                cursor=self._cursors.get(run_id),
                of_type=DagsterEventType.ASSET_OBSERVATION,
            )
        except Exception:  # the run may not exist yet; progress is best effort
            return
        self._cursors[run_id] = page.cursor
        for record in page.records:
            event = record.event_log_entry.dagster_event
            if event is not None and event.asset_observation_data is not None:
                observation = event.asset_observation_data.asset_observation
                metadata = {k: v.value for k, v in observation.metadata.items()}
                self._progress(observation.partition or partition, metadata)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _run_dataset(
    job: JobDefinition,
    instance: DagsterInstance,
    assets: Sequence[AssetKey],
    run_config: Mapping[str, Any],
) -> DatasetSummary:
    started = time.monotonic()
    try:
        with sigterm_kept():
            result = job.execute_in_process(
                instance=instance,
                asset_selection=list(assets),
                raise_on_error=False,
                run_config=dict(run_config),
                tags={RUN_TAG: "flux2-pipeline materialize"},
            )
    except KeyboardInterrupt:
        return DatasetSummary(False, time.monotonic() - started, error="stopped")
    seconds = time.monotonic() - started
    if not result.success:
        return DatasetSummary(False, seconds, error=_error(result))
    metadata = _metadata(result)
    dataset = DatasetMetadata.extract(metadata)
    return DatasetSummary(
        True,
        seconds,
        rows=int(metadata.get("dagster/row_count", 0)),
        shards=dataset.shards or 0,
        path=dataset.path.path if dataset.path else None,
    )


def _metadata(result: ExecuteInProcessResult) -> dict[str, Any]:
    """Every materialization's and failure's metadata of the run, as plain values."""
    merged: dict[str, Any] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization is not None:
            merged.update({k: v.value for k, v in materialization.metadata.items()})
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        if data is not None and data.user_failure_data is not None:
            merged.update({k: v.value for k, v in data.user_failure_data.metadata.items()})
    return merged


@dataclass
class _RunFigures:
    """A run's events sorted by partition."""

    figures: dict[str, dict[str, Any]]
    """Each partition's materialization and failure metadata."""
    materialized: dict[str, set[AssetKey]]
    """The assets each partition was materialized for."""
    errors: dict[str, str]
    """The failure of each partition that failed on its own."""
    unattributed: bool = False
    """A step failed without naming its partitions (an exception in a check, a crash)."""
    stopped: bool = False
    """The run was stopped (its partitions that had finished are materialized)."""


def _by_partition(keys: Sequence[str], result: ExecuteInProcessResult) -> _RunFigures:
    """Each partition's metadata, how many materializations it got, and its own error."""
    figures: dict[str, dict[str, Any]] = {key: {} for key in keys}
    materialized: dict[str, set[AssetKey]] = {key: set() for key in keys}
    errors: dict[str, str] = {}
    unattributed = stopped = False
    only = keys[0] if len(keys) == 1 else None
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        key = materialization.partition or only
        if key in figures:
            figures[key].update({k: v.value for k, v in materialization.metadata.items()})
            materialized[key].add(materialization.asset_key)
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        if data is None or data.user_failure_data is None:
            unattributed = True
            continue
        metadata = {k: v.value for k, v in data.user_failure_data.metadata.items()}
        step = StepFailureMetadata.extract(metadata)
        failures = step.partition_failures.data if step.partition_failures else None
        stopped = stopped or bool(step.interrupted)
        if isinstance(failures, dict):
            for key, details in failures.items():
                if key in figures and isinstance(details, dict):
                    figures[key].update(details)
                    errors.setdefault(key, str(details.get("error") or "failed"))
        elif only is not None:
            figures[only].update(metadata)
            if data.user_failure_data.description:
                errors.setdefault(only, str(data.user_failure_data.description))
        else:
            unattributed = True
    if not result.success and not result.get_step_failure_events():
        unattributed = True  # the run failed outside its steps (a resource, the executor)
    return _RunFigures(figures, materialized, errors, unattributed, stopped)


def _summarize(
    keys: Sequence[str],
    assets: Sequence[AssetKey],
    result: ExecuteInProcessResult,
    seconds: float,
) -> list[PartitionSummary]:
    run = _by_partition(keys, result)
    run_error = None if result.success else (_error(result) or "the run failed")
    summaries = []
    for key in keys:
        error = run.errors.get(key)
        missing = [asset for asset in assets if asset not in run.materialized[key]]
        blocked = not result.success and error is None and bool(run.errors)
        blocked = blocked and not run.unattributed and not run.stopped
        if result.success:
            done = True
        elif blocked:
            # Its own steps succeeded, but a neighbour's failure in the same run skipped
            # the steps after them (checks, later assets).
            done, error = False, _skipped(run.errors)
        else:
            done = error is None and not run.unattributed and not missing
            error = error if done or error is not None else run_error
        summary = _summary(key, run.figures[key], done, error, seconds)
        summaries.append(
            replace(
                summary,
                blocked=blocked,
                skipped_assets=tuple(asset.to_user_string() for asset in missing),
                interrupted=summary.interrupted or run.stopped,
            )
        )
    return summaries


def _skipped(errors: Mapping[str, str]) -> str:
    return f"later steps did not run: partition {next(iter(errors))} failed in the same run"


def _summary(
    key: str, metadata: Mapping[str, Any], succeeded: bool, error: str | None, seconds: float
) -> PartitionSummary:
    edits, images = EditsMetadata.extract(metadata), ImagesMetadata.extract(metadata)
    completed, failed = edits.completed or 0, edits.failed or 0
    invalid, cancelled = edits.invalid or 0, edits.cancelled or 0
    return PartitionSummary(
        key,
        succeeded,
        edits.seconds or seconds,
        rows=completed + failed + invalid + cancelled,
        completed=completed,
        failed=failed,
        invalid=invalid,
        cancelled=cancelled,
        cost_usd=edits.cost_usd or 0.0,
        error=None if succeeded else error,
        results_path=edits.results_path.path if edits.results_path else None,
        images=images.images_stored or 0,
        images_failed=images.images_failed or 0,
        interrupted=bool(StepFailureMetadata.extract(metadata).interrupted),
    )


def _error(result: ExecuteInProcessResult) -> str | None:
    """The first failure in one line: a Failure's description, else the innermost cause."""
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        if data is None:
            continue
        if data.user_failure_data is not None and data.user_failure_data.description:
            return str(data.user_failure_data.description)
        if data.error is not None:
            return innermost_error(data.error)
    # A failure outside a step (a resource that could not start): the event carrying the error.
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        if isinstance(error, SerializableErrorInfo):
            return innermost_error(error)
    for event in result.all_events:
        if event.event_type == DagsterEventType.RUN_FAILURE:
            return event.message or "the run failed"
    return None


def innermost_error(error: SerializableErrorInfo) -> str:
    """`ClassName: message` of the deepest cause of `error`, on one line.

    Dagster wraps a step's exception ("Error occurred while executing op ..."); the
    person at the terminal needs what went wrong underneath.
    """
    while True:
        deeper = error.cause or error.context
        if deeper is None:
            break
        error = deeper
    lines = [line.strip() for line in (error.message or "").splitlines() if line.strip()]
    text = lines[0] if lines else error.cls_name or "unknown error"
    name = (error.cls_name or "").rsplit(".", 1)[-1]
    return text if not name or text.split(":", 1)[0].endswith(name) else f"{name}: {text}"


def format_summary(summaries: Sequence[PartitionSummary]) -> str:
    """A plain-text table of the partition summaries."""
    header = (
        "partition",
        "rows",
        "completed",
        "failed",
        "invalid",
        "cancelled",
        "images",
        "cost_usd",
        "seconds",
        "result",
    )
    rows = [header]
    for s in summaries:
        rows.append(
            (
                s.partition,
                str(s.rows),
                str(s.completed),
                str(s.failed),
                str(s.invalid),
                str(s.cancelled),
                str(s.images) + (f" ({s.images_failed} failed)" if s.images_failed else ""),
                f"{s.cost_usd:.2f}",
                f"{s.seconds:.1f}",
                "ok" if s.succeeded else ("STOPPED" if s.interrupted else "FAILED"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    for s in summaries:
        if not s.succeeded and s.error:
            lines.append(f"{s.partition}: {s.error}")
    return "\n".join(lines)


def format_report(report: MaterializeReport) -> str:
    """`format_summary` of the partitions, the skipped files and the training dataset."""
    lines = [format_summary(report.partitions)] if report.partitions else []
    lines.extend(InputScan(skipped=report.skipped).skipped_lines())
    if report.interrupted:
        lines.append("stopped: the remaining partitions were not started")
    dataset = report.dataset
    if dataset is not None:
        if dataset.succeeded:
            lines.append(
                f"training dataset: {dataset.rows} rows in {dataset.shards} shards "
                f"({dataset.seconds:.1f} s) at {dataset.path}"
            )
        else:
            lines.append(f"training dataset: FAILED: {dataset.error}")
    return "\n".join(lines)
