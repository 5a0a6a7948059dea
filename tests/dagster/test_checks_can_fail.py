"""Each of the six asset checks, made to fail, with its severity and its message.

The partition is built by `flux2-pipeline materialize` in a subprocess (the contract's
surface), once for the module; each test gets its own copy of the folders it wrote (the
Dagster instance, the ledger, the results) and reads the check evaluations back from
that copy's event log.
Checks the pipeline cannot fail on its own (duplicate request ids, a short output list,
a tampered image) are then re-run alone, through the `Definitions` that `dagster dev`
loads, against files changed the way a broken writer or a bad disk would change them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    ExecuteInProcessResult,
)
from dagster._utils.error import SerializableErrorInfo

from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.cli import CLI
from tests.helpers.emulator import TEST_TOKEN, emulator_config, prompt_rows
from tests.helpers.tables import write_table

KEY = "checked"

pytestmark = pytest.mark.slow


@dataclass
class Built:
    """A partition built by the CLI, with the environment and instance it used."""

    env: dict[str, str]
    output: Path
    instance: DagsterInstance
    cli: subprocess.CompletedProcess[str]

    @property
    def results(self) -> Path:
        return self.output / "flux2_edits" / f"{KEY}.parquet"

    def evaluations(self, key: str = KEY) -> dict[str, AssetCheckEvaluation]:
        """The latest evaluation of each check on partition `key`, from the event log."""
        entries = [
            entry
            for run in self.instance.get_runs()
            for entry in self.instance.all_logs(
                run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION
            )
        ]
        latest: dict[str, AssetCheckEvaluation] = {}
        for entry in sorted(entries, key=lambda e: e.timestamp):
            event = entry.dagster_event
            assert event is not None
            evaluation = event.event_specific_data
            assert isinstance(evaluation, AssetCheckEvaluation)
            if evaluation.partition == key:
                latest[evaluation.check_name] = evaluation
        return latest

    def evaluation_runs(self, name: str, key: str) -> list[str]:
        """The runs that evaluated check `name` on partition `key`."""
        return [
            run.run_id
            for run in self.instance.get_runs()
            for entry in self.instance.all_logs(
                run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION
            )
            if entry.dagster_event is not None
            and entry.dagster_event.event_specific_data.check_name == name  # type: ignore[union-attr]
            and entry.dagster_event.event_specific_data.partition == key  # type: ignore[union-attr]
        ]

    def run_check(
        self,
        asset: str,
        name: str,
        monkeypatch: pytest.MonkeyPatch,
        key: str = KEY,
        *,
        blocking: bool = False,
        downstream: frozenset[AssetKey] = frozenset(),
    ) -> ExecuteInProcessResult:
        """Run one check alone through the project's `defs`, as the UI's "Execute" does.

        `blocking`: the check fails, and being blocking it fails its step, so nothing of
        `downstream` (selected with it) runs."""
        for variable, value in self.env.items():
            if variable.startswith(("RUNCOMFY_", "FLUX2_")):
                monkeypatch.setenv(variable, value)
        # What `dagster dev` loads from flux2_pipeline.definitions, built from this env.
        job = Settings.from_env().definitions().resolve_implicit_global_asset_job_def()
        check = AssetCheckKey(AssetKey(asset), name)
        result = job.get_subset(
            asset_selection=set(downstream), asset_check_selection={check}
        ).execute_in_process(instance=self.instance, partition_key=key, raise_on_error=False)
        failures = [
            error_messages(event.step_failure_data.error)
            for event in result.all_events
            if event.is_step_failure
        ]
        if not blocking:
            assert result.success, failures
            return result
        assert not result.success
        assert [f"1 blocking asset check failed with ERROR severity: {asset}: {name}"] == [
            " ".join(failure.split()).removeprefix(
                "dagster._core.errors.DagsterAssetCheckFailedError: "
            )
            for failure in failures
        ]
        assert not result.get_asset_materialization_events()  # downstream never ran
        planned = {node.name for node in result.job_def.nodes_in_topological_order}
        started = {event.step_key for event in result.all_events if event.is_step_start}
        assert planned == {asset, *(key.to_python_identifier() for key in downstream)}
        assert started == {asset}
        return result


def error_messages(error: SerializableErrorInfo | None) -> str:
    """The messages of an error and of every error that caused it, outermost first."""
    messages = []
    while error is not None:
        messages.append(error.message.strip())
        error = error.cause or error.context
    return " <- ".join(messages)


def metadata(evaluation: AssetCheckEvaluation) -> dict[str, Any]:
    return {key: value.value for key, value in evaluation.metadata.items()}


def cli_env(root: Path, base_url: str) -> dict[str, str]:
    """The CLI's environment for the folders under `root`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "FLUX2_"))}
    env.update(
        RUNCOMFY_BASE_URL=base_url,
        RUNCOMFY_API_TOKEN=TEST_TOKEN,
        FLUX2_INPUT_DIR=str(root / "prompts"),
        FLUX2_OUTPUT_DIR=str(root / "output"),
        FLUX2_STEP_RETRIES="0",
        DAGSTER_HOME=str(root / "dagster_home"),
    )
    return env


@dataclass
class Pristine:
    """The module's partitions as the CLI left them, never changed by a test."""

    root: Path
    base_url: str
    cli: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pristine]:
    """Partition `checked`: four good rows and one invalid; `broken`: a reference 404s."""
    root = tmp_path_factory.mktemp("built")
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with EmulatorServer(emulator_config()) as emulator:
        rows = prompt_rows(emulator.base_url, KEY, 4, guidance_scale=None)
        rows.append({**prompt_rows(emulator.base_url, "bad", 1)[0], "guidance_scale": 99.0})
        write_table(root / "prompts", KEY, rows)
        broken = prompt_rows(emulator.base_url, "broken", 2)
        broken[1]["image_urls"] = [f"{emulator.base_url}/v1/outputs/none/0.png"]  # a 404
        write_table(root / "prompts", "broken", broken)
        env = cli_env(root, emulator.base_url)
        cli = subprocess.run(
            [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=300
        )
        yield Pristine(root, emulator.base_url, cli)


@pytest.fixture
def built(pristine: Pristine, tmp_path: Path) -> Iterator[Built]:
    """A copy of the module's partitions (instance, ledger, results, images) for one test
    to break as it likes."""
    root = tmp_path / "built"
    shutil.copytree(pristine.root, root)
    env = cli_env(root, pristine.base_url)
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        yield Built(env, root / "output", instance, pristine.cli)
    finally:
        instance.dispose()


def test_an_invalid_row_fails_no_invalid_rows_through_the_cli(built: Built) -> None:
    assert built.cli.returncode == 1, built.cli.stdout + built.cli.stderr  # `broken` failed
    evaluations = built.evaluations()
    assert set(evaluations) == {
        "all_valid_rows_completed",
        "request_ids_unique",
        "no_invalid_rows",
        "completed_rows_have_all_images",
        "edited_images_stored",
        "edited_image_sizes_match_preset",
    }
    invalid = evaluations.pop("no_invalid_rows")
    assert not invalid.passed and invalid.severity is AssetCheckSeverity.WARN
    assert metadata(invalid)["invalid_rows"] == 1
    assert metadata(invalid)["examples"].startswith("bad-0: ")
    assert "guidance_scale" in metadata(invalid)["examples"]
    assert all(evaluation.passed for evaluation in evaluations.values())


def test_a_failed_row_fails_all_valid_rows_completed(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI's step evaluated `broken`'s checks too: its file was written, its step failed.
    through_the_cli = built.evaluations(key="broken")["all_valid_rows_completed"]
    built.run_check(
        "flux2_edits", "all_valid_rows_completed", monkeypatch, key="broken", blocking=True
    )

    alone = built.evaluations(key="broken")["all_valid_rows_completed"]
    assert len(built.evaluation_runs("all_valid_rows_completed", "broken")) == 2
    for evaluation in (through_the_cli, alone):
        assert not evaluation.passed and evaluation.severity is AssetCheckSeverity.ERROR
        assert metadata(evaluation)["not_completed"] == 1
        example = metadata(evaluation)["examples"]
        assert example.startswith("broken-1: ") and "/v1/outputs/none/0.png" in example


def rewrite_results(path: Path, **columns: list[Any]) -> None:
    table = pq.read_table(path)
    for name, values in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(
            index, table.schema.field(index), pa.array(values, table.schema.field(index).type)
        )
    pq.write_table(table, path)


def test_a_request_id_on_two_rows_fails_request_ids_unique(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = pq.read_table(built.results).column("request_id").to_pylist()
    assert ids[1] is not None and ids[2] is not None
    rewrite_results(built.results, request_id=[ids[0], ids[1], ids[1], *ids[3:]])
    # Blocking: a job paid twice stops the partition's images.
    built.run_check(
        "flux2_edits",
        "request_ids_unique",
        monkeypatch,
        blocking=True,
        downstream=frozenset({AssetKey("flux2_images")}),
    )

    evaluation = built.evaluations()["request_ids_unique"]
    assert not evaluation.passed and evaluation.severity is AssetCheckSeverity.ERROR
    assert metadata(evaluation) == {"repeated": 1, "examples": ids[1]}


def test_a_completed_row_short_of_images_fails_completed_rows_have_all_images(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = pq.read_table(built.results).column("output_urls").to_pylist()
    assert len(urls[1]) == 1
    rewrite_results(built.results, output_urls=[urls[0], [], *urls[2:]])
    built.run_check("flux2_edits", "completed_rows_have_all_images", monkeypatch, blocking=True)

    evaluation = built.evaluations()["completed_rows_have_all_images"]
    assert not evaluation.passed and evaluation.severity is AssetCheckSeverity.ERROR
    assert metadata(evaluation) == {"rows_missing_images": 1, "examples": f"{KEY}-1"}


def test_a_missing_results_file_fails_the_check_run(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    built.results.unlink()
    # No evaluation to show: the check's step fails, naming the file it could not read.
    with pytest.raises(AssertionError, match=rf"flux2_edits/{KEY}\.parquet"):
        built.run_check("flux2_edits", "all_valid_rows_completed", monkeypatch)


def test_wrong_size_images_fail_edited_image_sizes_match_preset(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = pq.read_table(built.results).column("image_size").to_pylist()
    assert sizes[1] == "square_hd"
    rewrite_results(built.results, image_size=[sizes[0], "square", *sizes[2:]])
    built.run_check("flux2_images", "edited_image_sizes_match_preset", monkeypatch)

    evaluation = built.evaluations()["edited_image_sizes_match_preset"]
    assert not evaluation.passed and evaluation.severity is AssetCheckSeverity.WARN
    assert metadata(evaluation) == {
        "edited_images_checked": 4,
        "mismatched": 1,
        "examples": f"{KEY}-1[0]: 1024x1024, square is 512x512",
    }


def test_undecodable_and_missing_files_fail_edited_images_stored(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = pq.read_table(built.output / "flux2_images" / f"{KEY}.parquet").to_pylist()
    edited = {r["row_id"]: r for r in manifest if r["role"] == "edited"}
    assert sorted(edited) == [f"{KEY}-0", f"{KEY}-1", f"{KEY}-2", f"{KEY}-3"]
    broken = built.output / edited[f"{KEY}-1"]["path"]
    broken.write_bytes(b"\0" * broken.stat().st_size)  # same size: a flipped disk, not a rewrite
    (built.output / edited[f"{KEY}-3"]["path"]).unlink()
    built.run_check("flux2_images", "edited_images_stored", monkeypatch)

    evaluation = built.evaluations()["edited_images_stored"]
    assert not evaluation.passed and evaluation.severity is AssetCheckSeverity.ERROR
    found = metadata(evaluation)
    assert found["edited_images_expected"] == 4 and found["missing_or_broken"] == 2
    first, second = found["examples"].split("; ")
    assert first.startswith(f"{KEY}-1[0]: ") and "not a readable image" in first
    assert second == f"{KEY}-3[0]: file missing"
