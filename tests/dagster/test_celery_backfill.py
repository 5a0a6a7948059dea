"""Steps on Dagster's Celery workers: the deploy/celery profile on the local services.

Two `dagster-celery worker start` processes (each with its own name) read one Redis
database; the Dagster instance (deploy/celery/dagster.yaml) and the ledger live in fresh
PostgreSQL databases. Four partitions run on the deploy/celery code location, once as a
backfill (`dagster job backfill`, queued runs started by `dagster-daemon run` under the
profile's limits) and once as four `dagster asset materialize` commands at the same time.
Their steps spread over both workers, while `FLUX2_ACCOUNT_CONCURRENCY` keeps the account
under a cap the workers could exceed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunRecord, RunsFilter

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import Ledger
from tests.helpers.cli import BIN
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.postgres import fresh_database
from tests.helpers.tables import write_table

pytestmark = [pytest.mark.postgres, pytest.mark.celery, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CELERY_DIR = REPO / "deploy" / "celery"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PARTITIONS = ("north", "south", "east", "west")
ROWS = 10
ACCOUNT_CAP = 4
PER_STEP = 8  # two workers x one step each x 8 = 16 could be in flight without the cap
WORKERS = ("flux2-worker-a", "flux2-worker-b")
CLAIM_KEY = "flux2:celery-test-claim"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def services() -> None:
    """Skip without the local Redis or PostgreSQL, except under CI, where it fails."""
    missing = [
        name
        for name, port in (("Redis", REDIS_PORT), ("PostgreSQL", 5432))
        if not _reachable("127.0.0.1", port)
    ]
    if missing:
        reason = f"{' and '.join(missing)} not reachable on 127.0.0.1"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the Celery test")
        pytest.skip(reason)


@pytest.fixture
def redis_db(services: None) -> Iterator[int]:
    """An empty Redis database number claimed for this test, emptied afterwards."""
    import redis

    for number in range(15, 0, -1):
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
        if client.dbsize() == 0 and client.set(CLAIM_KEY, uuid.uuid4().hex, nx=True):
            try:
                yield number
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    pytest.fail("no empty Redis database among 1..15 for the Celery broker")


@pytest.fixture
def databases(services: None) -> Iterator[tuple[str, str]]:
    """Fresh PostgreSQL databases for the Dagster instance and for the ledger."""
    with (
        fresh_database("flux2_celery_dagster") as dagster,
        fresh_database("flux2_celery_ledger") as ledger,
    ):
        yield dagster, ledger


@pytest.fixture
def roomy_emulator() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(port=0, latency=0.5, max_concurrent=64, token=TEST_TOKEN, seed=13)
    with EmulatorServer(config) as server:
        yield server


@pytest.fixture
def deploy_env(
    tmp_path: Path,
    roomy_emulator: EmulatorServer,
    redis_db: int,
    databases: tuple[str, str],
) -> dict[str, str]:
    """What every process of the deployment sees: workers, runs and this test alike."""
    dagster_url, ledger_url = databases
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(CELERY_DIR / "dagster.yaml", home / "dagster.yaml")
    broker = f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "FLUX2_"))}
    env.update(
        DAGSTER_HOME=str(home),
        DAGSTER_POSTGRES_URL=dagster_url,
        DAGSTER_CELERY_BROKER_URL=broker,
        DAGSTER_CELERY_BACKEND_URL=broker,
        RUNCOMFY_BASE_URL=roomy_emulator.base_url,
        RUNCOMFY_API_TOKEN=TEST_TOKEN,
        FLUX2_INPUT_DIR=str(tmp_path / "prompts"),
        FLUX2_OUTPUT_DIR=str(tmp_path / "output"),
        FLUX2_LEDGER_URL=ledger_url,
        FLUX2_MAX_CONCURRENCY=str(PER_STEP),
        FLUX2_ACCOUNT_CONCURRENCY=str(ACCOUNT_CAP),
        FLUX2_STEP_RETRIES="0",
        # `dagster-celery worker start` runs `celery` from the PATH, as an activated venv has.
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (the CLI and the Celery worker it runs), then wait."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture
def workers(deploy_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Two named Celery workers, one step at a time each; their logs by name."""
    logs = {name: tmp_path / f"{name}.log" for name in WORKERS}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name, log in logs.items():
            with log.open("wb") as out:
                processes.append(
                    subprocess.Popen(
                        [
                            str(BIN / "dagster-celery"),
                            "worker",
                            "start",
                            "--name",
                            name,
                            "--config-yaml",
                            str(CELERY_DIR / "celery.yaml"),
                            "--app",
                            "dagster_celery.app",
                            "--",
                            "--concurrency=1",
                        ],
                        env=deploy_env,
                        cwd=tmp_path,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + 120
        while not all(" ready." in log.read_text(errors="replace") for log in logs.values()):
            for process, log in zip(processes, logs.values(), strict=True):
                assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the Celery workers did not start in 120 s"
            time.sleep(0.2)
        yield logs
    finally:
        for process in processes:
            _stop(process)


def _materialize(env: dict[str, str], partition: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-f",
            str(CELERY_DIR / "definitions.py"),
            "--select",
            "flux2_edits,flux2_images",
            "--partition",
            partition,
        ],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _celery_workers_of_steps(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    """Step key -> the Celery worker that ran it, from the run's engine events."""
    ran_on: dict[str, str] = {}
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        assert event is not None
        metadata = event.engine_event_data.metadata
        if "Celery worker" in metadata and event.step_key is not None:
            ran_on[event.step_key] = str(metadata["Celery worker"].value)
    return ran_on


def test_a_backfill_of_four_partitions_on_two_celery_workers(
    tmp_path: Path,
    deploy_env: dict[str, str],
    workers: dict[str, Path],
    roomy_emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in PARTITIONS:
        write_table(tmp_path / "prompts", key, prompt_rows(roomy_emulator.base_url, key, ROWS))
    for name in ("DAGSTER_HOME", "DAGSTER_POSTGRES_URL"):
        monkeypatch.setenv(name, deploy_env[name])
    instance = DagsterInstance.get()
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        instance.add_dynamic_partitions("flux2_prompt_tables", list(PARTITIONS))

        runs = [_materialize(deploy_env, key, tmp_path) for key in PARTITIONS]
        outputs = [run.communicate(timeout=300) for run in runs]
        for run, (stdout, stderr) in zip(runs, outputs, strict=True):
            assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]

        records = instance.get_run_records(RunsFilter())
        assert len(records) == len(PARTITIONS)
        assert {r.dagster_run.status for r in records} == {DagsterRunStatus.SUCCESS}
        assert sorted(r.dagster_run.tags["dagster/partition"] for r in records) == sorted(
            PARTITIONS
        )
        ran_on: dict[str, str] = {}
        for record in records:
            steps = _celery_workers_of_steps(instance, record.dagster_run.run_id)
            # Both of the run's steps went through Celery.
            assert {"flux2_edits", "flux2_images"} <= set(steps), steps
            ran_on.update({f"{record.dagster_run.run_id}:{k}": v for k, v in steps.items()})
    finally:
        instance.dispose()

    worker_names = {host.split("@", 1)[0] for host in ran_on.values()}
    assert worker_names == set(WORKERS), ran_on

    _assert_each_row_paid_once_under_the_cap(roomy_emulator, deploy_env, tmp_path)


def _start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """A Dagster command in its own process group, its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_for_runs(instance: DagsterInstance, count: int, timeout: float) -> list[RunRecord]:
    """The run records once `count` runs exist and all have ended."""
    deadline = time.monotonic() + timeout
    while True:
        records = instance.get_run_records(RunsFilter())
        if len(records) >= count and all(r.dagster_run.is_finished for r in records):
            return list(records)
        statuses = sorted(r.dagster_run.status.value for r in records)
        assert time.monotonic() < deadline, f"runs not finished in {timeout} s: {statuses}"
        time.sleep(0.5)


def test_a_daemon_backfill_of_four_partitions_on_two_celery_workers(
    tmp_path: Path,
    deploy_env: dict[str, str],
    workers: dict[str, Path],
    roomy_emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in PARTITIONS:
        write_table(tmp_path / "prompts", key, prompt_rows(roomy_emulator.base_url, key, ROWS))
    for name in ("DAGSTER_HOME", "DAGSTER_POSTGRES_URL"):
        monkeypatch.setenv(name, deploy_env[name])
    location = ["-f", str(CELERY_DIR / "definitions.py")]
    instance = DagsterInstance.get()
    daemon = _start(
        [str(BIN / "dagster-daemon"), "run", *location],
        deploy_env,
        tmp_path,
        tmp_path / "daemon.log",
    )
    try:
        instance.add_dynamic_partitions("flux2_prompt_tables", list(PARTITIONS))
        backfill = subprocess.run(
            [
                str(BIN / "dagster"),
                "job",
                "backfill",
                *location,
                "-j",
                "flux2_edits_job",
                "--partitions",
                ",".join(PARTITIONS),
                "--noprompt",
            ],
            env=deploy_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert backfill.returncode == 0, backfill.stdout[-3000:] + backfill.stderr[-3000:]
        records = _wait_for_runs(instance, len(PARTITIONS), timeout=240)
        log = (tmp_path / "daemon.log").read_text(errors="replace")[-3000:]
        assert {r.dagster_run.status for r in records} == {DagsterRunStatus.SUCCESS}, log
        assert sorted(r.dagster_run.tags["dagster/partition"] for r in records) == sorted(
            PARTITIONS
        )
        # Every run was queued by the backfill and started by the daemon.
        assert {r.dagster_run.tags.get("dagster/backfill") for r in records} != {None}
        ran_on: dict[str, str] = {}
        for record in records:
            steps = _celery_workers_of_steps(instance, record.dagster_run.run_id)
            assert "flux2_edits" in steps, steps
            ran_on.update({f"{record.dagster_run.run_id}:{k}": v for k, v in steps.items()})
    finally:
        _stop(daemon)
        instance.dispose()

    assert {host.split("@", 1)[0] for host in ran_on.values()} == set(WORKERS), ran_on
    _assert_each_row_paid_once_under_the_cap(roomy_emulator, deploy_env, tmp_path)


def _assert_each_row_paid_once_under_the_cap(
    emulator: EmulatorServer, env: dict[str, str], tmp_path: Path
) -> None:
    """The emulator's and the ledger's view: every row paid once, never over the cap."""
    counters = emulator.state.counters
    assert counters.jobs_created == len(PARTITIONS) * ROWS
    assert counters.duplicate_bodies == 0
    assert counters.max_queue_length == 0
    assert counters.max_in_progress <= ACCOUNT_CAP
    for key in PARTITIONS:
        table = pq.read_table(tmp_path / "output" / "flux2_edits" / f"{key}.parquet")
        rows = table.to_pylist()
        assert [row["status"] for row in rows] == ["completed"] * ROWS
        assert all(row["attempts"] == 1 for row in rows)
    with Ledger.open(env["FLUX2_LEDGER_URL"]) as ledger:
        attempts = ledger.submissions()
        assert ledger.open_attempts() == 0
    assert len(attempts) == len(PARTITIONS) * ROWS
    assert {a.state.value for a in attempts} == {"completed"}
