"""The worker server's early start: a cheap guess, made before Dagster is imported."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from flux2_pipeline import workers
from flux2_pipeline.assets.ranges import DEFAULT_PARTITIONS_PER_RUN
from flux2_pipeline.settings import DEFAULT_PARALLEL_PARTITIONS


def test_the_guess_uses_the_settings_defaults() -> None:
    assert workers.DEFAULT_PER_RUN == DEFAULT_PARTITIONS_PER_RUN
    assert workers.DEFAULT_PARALLEL == DEFAULT_PARALLEL_PARTITIONS


@pytest.mark.parametrize("name", workers.PRELOAD)
def test_every_preloaded_module_exists(name: str) -> None:
    # The server skips a name that does not import: a Dagster upgrade that moved one
    # would quietly make every worker import it again after its fork.
    importlib.import_module(name)


def test_the_command_line_starts_the_server_before_importing_dagster() -> None:
    code = "import sys, flux2_pipeline.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'pandas', 'sqlalchemy')))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("files", "partitions", "parallel", "environ", "needed"),
    [
        (26, [], None, {}, True),  # two runs of the default 25
        (25, [], None, {}, False),  # one run: the command runs it in its own process
        (26, [], 1, {}, False),  # --parallel 1
        (26, [], None, {"FLUX2_PARALLEL_PARTITIONS": "1"}, False),
        (3, [], None, {"FLUX2_PARTITIONS_PER_RUN": "1"}, True),
        (0, ["a", "b"], None, {"FLUX2_PARTITIONS_PER_RUN": "1"}, True),  # --partition a,b
        (3, [], None, {"FLUX2_PARTITIONS_PER_RUN": "one"}, False),  # Settings will say why
    ],
)
def test_the_server_is_started_early_only_when_several_runs_are_likely(
    tmp_path: Path,
    files: int,
    partitions: list[str],
    parallel: int | None,
    environ: dict[str, str],
    needed: bool,
) -> None:
    for index in range(files):
        (tmp_path / f"p{index}.parquet").touch()
    (tmp_path / "notes.txt").touch()
    environ = {"FLUX2_INPUT_DIR": str(tmp_path), **environ}
    assert workers.likely_needed(partitions, parallel, environ) is needed


def test_no_input_folder_means_no_guess(tmp_path: Path) -> None:
    assert not workers.likely_needed([], None, {})
    assert not workers.likely_needed([], None, {"FLUX2_INPUT_DIR": str(tmp_path / "missing")})
