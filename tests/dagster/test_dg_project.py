"""What a `dg` user does on first use, in a fresh project, against the emulator.

Scaffold the component (a commented defs.yaml, a sample prompt table), have
`dg check yaml` refuse a value out of bounds with a pointer to its line, `dg check defs`,
then `dg launch` a file's partition and a range of them on a fresh DAGSTER_HOME, with no
sensor ever run: the partitions come from the folder when the code location loads.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance

from flux2_pipeline import Flux2EditsComponent
from flux2_pipeline.emulator import EmulatorServer
from tests.helpers.cli import BIN
from tests.helpers.emulator import TEST_TOKEN

pytestmark = pytest.mark.slow

WORKTREE = Path(__file__).resolve().parents[2]
PYPROJECT = """\
[project]
name = "fresh-project"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["flux2-pipeline"]

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "fresh_project"
registry_modules = ["flux2_pipeline"]
"""
DEFINITIONS = """\
from pathlib import Path

from dagster import Definitions, definitions, load_from_defs_folder


@definitions
def defs() -> Definitions:
    return load_from_defs_folder(path_within_project=Path(__file__).parent.parent)
"""


def fresh_project(root: Path) -> Path:
    """An empty dg project (what `dg scaffold project` lays out), without a virtualenv."""
    package = root / "fresh_project"
    (package / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "defs" / "__init__.py").write_text("")
    (package / "definitions.py").write_text(DEFINITIONS)
    return root


def dg(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dg"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture
def dg_env(tmp_path: Path, emulator: EmulatorServer) -> dict[str, str]:
    """The environment of a user with the flux2-pipeline virtualenv active (as
    `make check-defs` runs dg), the emulator as the API and a fresh DAGSTER_HOME."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("FLUX2_", "RUNCOMFY_", "DAGSTER_"))
    }
    env.update(
        VIRTUAL_ENV=str(BIN.parent),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join([str(WORKTREE), str(tmp_path / "project")]),
        RUNCOMFY_BASE_URL=emulator.base_url,
        RUNCOMFY_API_TOKEN=TEST_TOKEN,
        DAGSTER_HOME=str(home),
    )
    return env


def test_scaffold_check_and_launch_a_partition_and_a_range_on_a_fresh_instance(
    tmp_path: Path, dg_env: dict[str, str], emulator: EmulatorServer
) -> None:
    project = fresh_project(tmp_path / "project")

    scaffolded = dg(
        project, dg_env, "scaffold", "defs", "flux2_pipeline.Flux2EditsComponent", "image_edits"
    )
    assert scaffolded.returncode == 0, scaffolded.stderr
    defs_yaml = project / "fresh_project" / "defs" / "image_edits" / "defs.yaml"
    text = defs_yaml.read_text()
    for name in Flux2EditsComponent.model().model_fields:
        assert re.search(rf"^  (# )?{name}:", text, re.MULTILINE), f"{name} not in defs.yaml"
    for variable in ("RUNCOMFY_BASE_URL", "RUNCOMFY_API_TOKEN", "FLUX2_LEDGER_URL"):
        assert variable in scaffolded.stdout and variable in text
    sample = project / "data" / "prompts" / "example.parquet"
    assert pq.read_table(sample).num_rows == 3
    for copy in ("example_b", "example_c"):
        shutil.copy(sample, sample.with_name(f"{copy}.parquet"))

    assert dg(project, dg_env, "check", "yaml").returncode == 0
    for good, bad in (
        ("max_concurrency: 8", "max_concurrency: 0"),
        ('# defaults: {"image_size"', 'defaults: {"image_size": "huge"}  # {"image_size"'),
    ):
        defs_yaml.write_text(text.replace(good, bad))
        refused = dg(project, dg_env, "check", "yaml")
        assert refused.returncode == 1
        line = next(
            n for n, row in enumerate(text.replace(good, bad).splitlines(), 1) if bad in row
        )
        assert re.search(
            rf"^\s*{line} \|\s+{re.escape(bad)}", refused.stdout + refused.stderr, re.MULTILINE
        ), refused.stdout + refused.stderr
        assert "is not valid under any of the given schemas" in refused.stdout + refused.stderr
    defs_yaml.write_text(text)

    checked = dg(project, dg_env, "check", "defs", "--use-active-venv")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    one = dg(project, dg_env, "launch", "--assets", "flux2_edits", "--partition", "example")
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    ranged = dg(
        project,
        dg_env,
        "launch",
        "--assets",
        "flux2_edits",
        "--partition-range",
        "example_b...example_c",
    )
    assert ranged.returncode == 0, ranged.stdout[-3000:] + ranged.stderr[-3000:]

    for key in ("example", "example_b", "example_c"):
        results = pq.read_table(project / "data" / "output" / "flux2_edits" / f"{key}.parquet")
        assert results.column("status").to_pylist() == ["completed"] * 3
    assert emulator.state.counters.jobs_created == 9
    with DagsterInstance.from_config(dg_env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        assert len(runs) == 2  # one of the partition, one of the whole range
        assert {run.tags.get("dagster/asset_partition_range_start") for run in runs} == {
            None,
            "example_b",
        }
        assert not instance.all_instigator_state()  # no sensor ever ran
