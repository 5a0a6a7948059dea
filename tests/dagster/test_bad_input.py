"""Bad input through `run_backfill` and the CLI: clear errors, the rest carries on.

One input folder holds several partitions: rows that break the schema become `invalid`
without failing their partition; a table that is unusable as a whole fails only its own
partition, with a one-line error a person can act on.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, instance_for_test

from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.cli.report import PartitionSummary
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.cli import CLI
from tests.helpers.emulator import emulator_config
from tests.helpers.environment import point_pipeline_at
from tests.helpers.tables import write_table

INPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("image_urls", pa.list_(pa.string())),
        pa.field("guidance_scale", pa.float64()),
        pa.field("seed", pa.int64()),
        pa.field("num_inference_steps", pa.int64()),
        pa.field("image_size", pa.string()),
        pa.field("num_images", pa.int64()),
        pa.field("output_format", pa.string()),
    ]
)

# (id, overrides, the rule its error must state; None for a row that completes)
MIXED_ROWS: list[tuple[str, dict[str, Any], tuple[str, ...] | None]] = [
    ("good-1", {}, None),
    ("empty-prompt", {"prompt": ""}, ("prompt:", "must not be empty")),
    ("blank-prompt", {"prompt": "   "}, ("prompt:", "must not be blank")),
    ("no-urls", {"image_urls": []}, ("image_urls:", "1 to 3")),
    ("five-urls", {"image_urls": "five"}, None),
    ("ftp-url", {"image_urls": ["ftp://example.test/a.png"]}, ("image_urls:", "http(s)")),
    ("guidance-25", {"guidance_scale": 25.0}, ("guidance_scale:", "less than or equal to 20")),
    ("guidance-nan", {"guidance_scale": math.nan}, ("guidance_scale:", "finite")),
    ("images-5", {"num_images": 5}, ("num_images:", "less than or equal to 4")),
    ("steps-2", {"num_inference_steps": 2}, ("num_inference_steps:", "greater than or equal to 4")),
    ("size-huge", {"image_size": "huge"}, ("image_size:", "square_hd")),
    ("format-gif", {"output_format": "gif"}, ("output_format:", "'jpeg', 'png' or 'webp'")),
    ("good-1", {"prompt": "a second row reusing an id"}, ("id:", "duplicate", "'good-1'")),
    ("nulls", {name: None for name in INPUT_SCHEMA.names[3:]}, None),
    ("good-2", {"seed": 7, "image_size": "square", "output_format": "webp"}, None),
]


def mixed_table(base_url: str) -> pa.Table:
    rows = []
    for position, (row_id, overrides, _) in enumerate(MIXED_ROWS):
        row: dict[str, Any] = {
            "id": row_id,
            "prompt": f"edit number {position}",
            "image_urls": [f"{base_url}/samples/mixed-{position}.png"],
            "guidance_scale": 3.0,
            "seed": position,
            "num_inference_steps": 8,
            "image_size": "square",
            "num_images": 1,
            "output_format": "png",
            **overrides,
        }
        if row["image_urls"] == "five":
            row["image_urls"] = [f"{base_url}/samples/five-{i}.png" for i in range(5)]
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    nan_row = [row_id for row_id, _, _ in MIXED_ROWS].index("guidance-nan")
    assert math.isnan(table["guidance_scale"][nan_row].as_py())  # NaN, not null
    return table


def by_partition(summaries: list[PartitionSummary]) -> dict[str, PartitionSummary]:
    return {s.partition: s for s in summaries}


def assert_human_error(summary: PartitionSummary, *needles: str) -> None:
    assert not summary.succeeded
    assert summary.error is not None
    assert "\n" not in summary.error
    assert "Traceback" not in summary.error and 'File "' not in summary.error
    assert summary.error.startswith(f"partition {summary.partition}: ")
    for needle in needles:
        assert needle in summary.error, summary.error


def write_bad_tables(folder: Path, base: str) -> None:
    """One input folder, one partition per way a table can be bad (and a mixed one)."""
    write_table(folder, "a_mixed", mixed_table(base))
    write_table(
        folder,
        "b_no_prompt",
        [{"id": "x", "image_urls": [f"{base}/samples/x.png"], "seed": 1}],
    )
    write_table(
        folder,
        "c_wrong_types",
        pa.table(
            {
                "prompt": pa.array([1, 2], pa.int64()),
                "image_urls": pa.array([[f"{base}/samples/t.png"]] * 2, pa.list_(pa.string())),
                "seed": pa.array(["abc", "def"], pa.string()),
            }
        ),
    )
    folder.joinpath("d_corrupt.parquet").write_bytes(os.urandom(64) + b"not parquet at all")
    folder.joinpath("e_empty_file.parquet").write_bytes(b"")
    write_table(
        folder,
        "f_zero_rows",
        pa.table(
            {
                "prompt": pa.array([], pa.string()),
                "image_urls": pa.array([], pa.list_(pa.string())),
            }
        ),
    )
    no_id_rows = [
        {"prompt": "same edit", "image_urls": [f"{base}/samples/n-0.png"]},
        {"prompt": "other edit", "image_urls": [f"{base}/samples/n-1.png"]},
        {"prompt": "same edit", "image_urls": [f"{base}/samples/n-0.png"]},
    ]
    write_table(folder, "g_no_id", no_id_rows)


@dataclass(frozen=True)
class BadInputRun:
    """The bad tables materialized together once; every scenario's test reads its part."""

    settings: Settings
    emulator: EmulatorServer
    instance: DagsterInstance
    summaries: dict[str, PartitionSummary]
    jobs_created: int
    """Jobs the emulator had created when the first materialization ended."""

    def results(self, partition: str) -> list[dict[str, Any]]:
        path = self.summaries[partition].results_path
        assert path is not None
        return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BadInputRun]:
    folder = tmp_path_factory.mktemp("bad_input")
    with (
        EmulatorServer(emulator_config()) as emulator,
        instance_for_test() as instance,
        pytest.MonkeyPatch.context() as monkeypatch,
    ):
        point_pipeline_at(monkeypatch, folder, emulator)
        settings = Settings.from_env()
        write_bad_tables(Path(settings.storage.input_dir), emulator.base_url)
        summaries = by_partition(run_backfill(settings, instance=instance).partitions)
        created = emulator.state.counters.jobs_created
        yield BadInputRun(settings, emulator, instance, summaries, created)


VALID_IDS = [row_id for row_id, _, rule in MIXED_ROWS if rule is None]


def test_every_table_is_a_partition_of_its_own(bad_input: BadInputRun) -> None:
    assert list(bad_input.summaries) == [
        "a_mixed",
        "b_no_prompt",
        "c_wrong_types",
        "d_corrupt",
        "e_empty_file",
        "f_zero_rows",
        "g_no_id",
    ]


def test_invalid_rows_are_reported_never_sent_and_do_not_fail_their_partition(
    bad_input: BadInputRun,
) -> None:
    mixed = bad_input.summaries["a_mixed"]
    assert mixed.succeeded and mixed.error is None
    assert (mixed.rows, mixed.completed, mixed.failed, mixed.cancelled) == (
        len(MIXED_ROWS),
        len(VALID_IDS),
        0,
        0,
    )
    assert mixed.invalid == len(MIXED_ROWS) - len(VALID_IDS)
    rows = bad_input.results("a_mixed")
    assert [row["row_id"] for row in rows] == [row_id for row_id, _, _ in MIXED_ROWS]
    for row, (row_id, _, rule) in zip(rows, MIXED_ROWS, strict=True):
        if rule is None:
            assert row["status"] == "completed", row
            assert row["request_id"] and row["output_urls"] and row["error"] is None
            assert row["attempts"] == 1
            continue
        assert row["status"] == "invalid", row
        assert row["request_id"] is None
        assert row["attempts"] == 0
        assert row["output_urls"] == []
        assert row["submitted_at"] is None
        error = row["error"]
        assert error is not None and error.startswith(rule[0]), (row_id, error)
        for word in rule[1:]:
            assert word in error, (row_id, error)


def test_five_urls_keep_the_first_three_with_a_warning_and_nulls_take_the_defaults(
    bad_input: BadInputRun,
) -> None:
    base = bad_input.emulator.base_url
    rows = bad_input.results("a_mixed")
    # "good-1" is given twice; the ids read here are unique.
    by_id = {row["row_id"]: row for row in rows if row["row_id"] != "good-1"}
    five = by_id["five-urls"]
    assert len(five["image_urls"]) == 3
    assert five["image_urls"] == [f"{base}/samples/five-{i}.png" for i in range(3)]
    assert five["warning"] == "image_urls: 5 URLs given, kept the first 3"
    assert all(row["warning"] is None for row in rows if row["row_id"] != "five-urls")
    nulls = by_id["nulls"]
    assert (
        nulls["guidance_scale"],
        nulls["seed"],
        nulls["num_inference_steps"],
        nulls["image_size"],
        nulls["num_images"],
        nulls["output_format"],
    ) == (2.5, 0, 28, "square_hd", 1, "png")
    good_2 = by_id["good-2"]
    assert (good_2["seed"], good_2["image_size"], good_2["output_format"]) == (7, "square", "webp")


def test_a_missing_required_column_fails_only_its_partition_naming_it(
    bad_input: BadInputRun,
) -> None:
    assert_human_error(bad_input.summaries["b_no_prompt"], "missing required column", "prompt")
    assert bad_input.summaries["b_no_prompt"].results_path is None


def test_wrong_column_types_make_every_row_invalid_naming_both_columns(
    bad_input: BadInputRun,
) -> None:
    wrong = bad_input.summaries["c_wrong_types"]
    assert wrong.succeeded and (wrong.rows, wrong.invalid) == (2, 2)
    for row in bad_input.results("c_wrong_types"):
        assert row["status"] == "invalid" and row["request_id"] is None
        assert "prompt:" in row["error"] and "string" in row["error"], row["error"]
        assert "seed:" in row["error"] and "integer" in row["error"], row["error"]


@pytest.mark.parametrize(
    ("partition", "words"),
    [("d_corrupt", "not a readable Parquet file"), ("e_empty_file", "empty")],
    ids=["corrupt", "empty"],
)
def test_an_unreadable_file_fails_its_partition_with_one_line_and_no_results(
    bad_input: BadInputRun, partition: str, words: str
) -> None:
    summary = bad_input.summaries[partition]
    assert_human_error(summary, f"{partition}.parquet", words)
    assert summary.results_path is None
    output = bad_input.settings.storage.output_root() / "flux2_edits"
    assert not (output / f"{partition}.parquet").exists()


def test_a_valid_table_of_zero_rows_succeeds_with_an_empty_results_file(
    bad_input: BadInputRun,
) -> None:
    zero = bad_input.summaries["f_zero_rows"]
    assert zero.succeeded and zero.error is None and zero.rows == 0
    assert zero.results_path is not None
    assert pq.read_table(zero.results_path).num_rows == 0


def test_rows_without_an_id_get_derived_ids_distinct_for_identical_rows(
    bad_input: BadInputRun,
) -> None:
    no_id = bad_input.summaries["g_no_id"]
    assert no_id.succeeded and no_id.completed == 3
    ids = [row["row_id"] for row in bad_input.results("g_no_id")]
    assert re.fullmatch(r"h-[0-9a-f]{16}", ids[0]) and re.fullmatch(r"h-[0-9a-f]{16}", ids[1])
    assert ids[2] == f"{ids[0]}-2"
    assert len(set(ids)) == 3


def test_only_the_valid_rows_were_sent(bad_input: BadInputRun) -> None:
    # The mixed table's valid rows and the three id-less rows.
    assert bad_input.jobs_created == len(VALID_IDS) + 3


def test_a_rerun_has_the_same_outcomes_and_ids_and_pays_nothing_twice(
    bad_input: BadInputRun,
) -> None:
    ids = [row["row_id"] for row in bad_input.results("g_no_id")]
    again = by_partition(run_backfill(bad_input.settings, instance=bad_input.instance).partitions)
    assert {key: s.succeeded for key, s in again.items()} == {
        key: s.succeeded for key, s in bad_input.summaries.items()
    }
    assert [row["row_id"] for row in bad_input.results("g_no_id")] == ids
    assert again["a_mixed"].completed == len(VALID_IDS)
    assert bad_input.emulator.state.counters.jobs_created == bad_input.jobs_created


def test_string_url_columns_float_ids_and_one_id_namespace_pay_each_row_once(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    base = emulator.base_url
    folder = Path(settings.storage.input_dir)
    start = emulator.state.counters.jobs_created
    # A whole image_urls column of plain strings: one URL per row.
    write_table(
        folder,
        "a_string_urls",
        pa.table(
            {
                "id": ["s-1", "s-2"],
                "prompt": ["first", "second"],
                "image_urls": [f"{base}/samples/s-1.png", f"{base}/samples/s-2.png"],
            }
        ),
    )
    # An integer id column that pandas turned into floats (one id missing).
    frame = pd.DataFrame(
        {
            "id": [1, None, 3],
            "prompt": ["one", "two", "three"],
            "image_urls": [[f"{base}/samples/f-{i}.png"] for i in range(3)],
        }
    )
    frame.to_parquet(folder / "b_float_ids.parquet")
    # An explicit id equal to a later id-less row's derived id.
    same = {"prompt": "same edit", "image_urls": [f"{base}/samples/n-0.png"]}
    write_table(folder, "c_probe", [same])
    summaries = by_partition(run_backfill(settings, instance=instance).partitions)
    probe = summaries["c_probe"].results_path
    assert probe is not None
    derived = pq.read_table(probe)["row_id"][0].as_py()
    (folder / "c_probe.parquet").unlink()
    write_table(
        folder,
        "d_namespace",
        [
            {"id": derived, "prompt": "another edit", "image_urls": [f"{base}/samples/x.png"]},
            {"id": None, **same},
        ],
    )
    created = emulator.state.counters.jobs_created
    summaries = by_partition(run_backfill(settings, instance=instance).partitions)

    results = {}
    for key in ("a_string_urls", "b_float_ids", "d_namespace"):
        path = summaries[key].results_path
        assert summaries[key].succeeded and path is not None, summaries[key]
        results[key] = pq.read_table(path).to_pylist()
        assert [row["status"] for row in results[key]] == ["completed"] * len(results[key])
    assert [row["image_urls"] for row in results["a_string_urls"]] == [
        [f"{base}/samples/s-1.png"],
        [f"{base}/samples/s-2.png"],
    ]
    float_ids = [row["row_id"] for row in results["b_float_ids"]]
    assert float_ids[0] == "1" and float_ids[2] == "3" and float_ids[1].startswith("h-")
    namespace_ids = [row["row_id"] for row in results["d_namespace"]]
    assert namespace_ids == [derived, f"{derived}-2"]
    # Every row paid for exactly once, each under its own id; the second run paid only
    # for the new partition.
    assert emulator.state.counters.jobs_created == created + 2
    assert created == start + 2 + 3 + 1


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RUNCOMFY_", "FLUX2_", "DAGSTER_"))
    }
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    # Without dagster.yaml, Dagster itself prints a notice on stderr; not ours to test.
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    full_env.update(
        FLUX2_INPUT_DIR=str(tmp_path / "prompts"),
        FLUX2_OUTPUT_DIR=str(tmp_path / "output"),
        DAGSTER_HOME=str(home),
    )
    full_env.update(env)
    return subprocess.run(
        [CLI, "materialize", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


LOOPBACK = {"RUNCOMFY_BASE_URL": "http://127.0.0.1:9"}  # no token needed; never contacted


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ((), {"FLUX2_MAX_CONCURRENCY": "abc", **LOOPBACK}, "FLUX2_MAX_CONCURRENCY"),
        ((), {}, "RUNCOMFY_API_TOKEN"),
        (("--partition", "nosuch"), LOOPBACK, "nosuch"),
        (("--select", "nosuch"), LOOPBACK, "nosuch"),
        ((), {"DAGSTER_HOME": "/nonexistent/dagster-home", **LOOPBACK}, "DAGSTER_HOME"),
        ((), {"DAGSTER_HOME": "relative/home", **LOOPBACK}, "DAGSTER_HOME"),
        ((), {"FLUX2_INPUT_DIR": "/nonexistent/prompts", **LOOPBACK}, "FLUX2_INPUT_DIR"),
    ],
    ids=[
        "bad-concurrency",
        "no-token-for-remote-api",
        "unknown-partition",
        "unknown-asset",
        "missing-dagster-home",
        "relative-dagster-home",
        "missing-input-dir",
    ],
)
def test_cli_configuration_errors_exit_2_with_one_line(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    write_table(
        tmp_path / "prompts",
        "real",
        [{"id": "r", "prompt": "p", "image_urls": ["http://127.0.0.1:9/a.png"]}],
    )
    result = run_cli(tmp_path, *args, **env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flux2-pipeline: error: ") and named in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "output" / "flux2_edits").exists()
