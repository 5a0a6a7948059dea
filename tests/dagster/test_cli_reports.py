"""What `flux2-pipeline materialize` tells a person, and first-time setup from two processes.

- An input file whose name cannot be a partition is reported with the reason, not skipped
  in silence; naming it with --partition says why (exit 2).
- A step that fails deep inside (the ledger unreachable) shows its innermost cause in one
  line, not Dagster's "Error occurred while executing op".
- Two commands on a brand-new output folder both set up the Dagster instance.
"""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path
from typing import Any

import pytest
from dagster._utils.error import serializable_error_info_from_exc_info

from flux2_pipeline.cli import main
from flux2_pipeline.cli.report import innermost_error
from flux2_pipeline.emulator import EmulatorServer
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    out, err = capsys.readouterr()
    return int(caught.value.code or 0), out, err


def test_input_files_that_cannot_be_partitions_are_reported(
    pipeline_env: dict[str, str], emulator: EmulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = Path(pipeline_env["FLUX2_INPUT_DIR"])
    write_table(inputs, "good", prompt_rows(emulator.base_url, "good", 2))
    write_table(inputs, "a,b", prompt_rows(emulator.base_url, "ab", 1))
    write_table(inputs, "x[1]", prompt_rows(emulator.base_url, "x", 1))

    code, out, _ = run_cli(["materialize", "--select", "flux2_edits"], capsys)
    assert code == 1, out  # not every input file became a partition
    assert "good" in out and "ok" in out
    assert "skipped input file a,b.parquet: its name contains ','" in out
    assert "skipped input file x[1].parquet: its name contains '['" in out
    assert emulator.state.counters.jobs_created == 2

    code, _, err = run_cli(["materialize", "--partition", "a,b"], capsys)
    assert code == 2
    assert err.strip() == (
        "flux2-pipeline: error: --partition: a,b.parquet cannot be a partition: its name "
        "contains ',', which Dagster uses to separate partition keys; rename the file"
    )


def test_a_deep_failure_shows_its_innermost_cause_in_one_line(
    pipeline_env: dict[str, str],
    emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    password = "pw-Innermost-77"
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    monkeypatch.setenv("FLUX2_LEDGER_URL", f"postgresql://postgres:{password}@127.0.0.1:1/x")
    write_table(
        Path(pipeline_env["FLUX2_INPUT_DIR"]), "deep", prompt_rows(emulator.base_url, "deep", 1)
    )
    code, out, err = run_cli(["materialize", "--select", "flux2_edits"], capsys)
    assert code == 1
    (line,) = [text for text in out.splitlines() if text.startswith("deep: ")]
    assert "Connection refused" in line or "connection" in line.lower(), line
    assert "Error occurred while" not in line and "resource_fn" not in line
    assert password not in out + err
    assert emulator.state.counters.jobs_created == 0


def test_innermost_error_follows_causes_to_the_bottom() -> None:
    def fail() -> None:
        try:
            try:
                raise ConnectionError("server closed the connection unexpectedly\nmore detail")
            except ConnectionError as exc:
                raise RuntimeError("ledger write failed") from exc
        except RuntimeError as exc:
            raise ValueError("Error occurred while executing op") from exc

    try:
        fail()
    except ValueError:
        info = serializable_error_info_from_exc_info(sys.exc_info())
    assert innermost_error(info) == "ConnectionError: server closed the connection unexpectedly"


def _open_fresh_instances(outputs: list[str], barrier: Any, results: Any) -> None:
    """Per output folder: wait for the other process, then set up its new instance."""
    from flux2_pipeline.cli.instance import open_instance
    from flux2_pipeline.resources import Flux2Storage, RunComfyResource
    from flux2_pipeline.settings import Settings

    for round_, output_dir in enumerate(outputs):
        settings = Settings.of(
            RunComfyResource(base_url="http://127.0.0.1:9"), Flux2Storage(output_dir=output_dir)
        )
        barrier.wait()  # both processes are at this round's folder: start together
        try:
            instance = open_instance(settings)
            instance.get_runs(limit=1)
            instance.dispose()
            results.put((round_, "ok"))
        except Exception as exc:
            results.put((round_, f"{type(exc).__name__}: {exc}".splitlines()[0]))


def test_two_processes_set_up_a_new_instance_at_once(tmp_path: Path) -> None:
    # Without the setup lock, 3 of 8 rounds failed with "table runs already exists" or
    # "alembic_version has more than one head". The two processes start (and import
    # Dagster) once, then race on a brand-new folder in each of the six rounds.
    rounds = 6
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    outputs = [str(tmp_path / f"fresh-{round_}") for round_ in range(rounds)]
    processes = [
        context.Process(target=_open_fresh_instances, args=(outputs, barrier, results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
    outcomes = sorted(results.get(timeout=10) for _ in range(2 * rounds))
    assert outcomes == [(round_, "ok") for round_ in range(rounds) for _ in range(2)]
