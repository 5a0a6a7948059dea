"""No secret in anything a run leaves behind (issue: secrets reached run storage in clear).

The API token and a PostgreSQL ledger password go in through the environment, a partition
is materialized by `flux2-pipeline materialize` and again by `dagster asset materialize`
(which captures compute logs), and then every byte under DAGSTER_HOME and the output
folder is searched: files as they are, each SQLite cell, and each zlib-compressed blob
(Dagster stores run and job snapshots compressed) decompressed. The console output too.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from flux2_pipeline.emulator import EmulatorServer
from tests.helpers.cli import BIN
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table

PASSWORD = "pw-Kq81zXv0s3cret"

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def ledger_database(postgres_database: str) -> str:
    """A throwaway database; the URL carries a password (trust auth ignores it)."""
    url = make_url(postgres_database).set(drivername="postgresql", password=PASSWORD)
    return url.render_as_string(hide_password=False)


def _texts(blob: bytes) -> Iterator[bytes]:
    """`blob`, and its zlib-decompressed form when it is one."""
    yield blob
    try:
        inflated = zlib.decompress(blob)
    except zlib.error:
        return
    yield inflated


def _sqlite_cells(path: Path) -> Iterator[bytes]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        tables = [
            row[0] for row in conn.execute("select name from sqlite_master where type='table'")
        ]
        for table in tables:
            for row in conn.execute(f'select * from "{table}"'):
                for cell in row:
                    if isinstance(cell, bytes):
                        yield from _texts(cell)
                    elif isinstance(cell, str):
                        yield cell.encode()


def everything_under(*folders: Path) -> Iterator[tuple[Path, bytes]]:
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            raw = path.read_bytes()
            for text_ in _texts(raw):
                yield path, text_
            if raw.startswith(b"SQLite format 3"):
                for cell in _sqlite_cells(path):
                    yield path, cell


def test_no_token_or_ledger_password_in_run_storage_logs_or_output(
    tmp_path: Path, emulator: EmulatorServer, ledger_database: str
) -> None:
    home, inputs, outputs = tmp_path / "home", tmp_path / "prompts", tmp_path / "output"
    home.mkdir()
    write_table(inputs, "secret-check", prompt_rows(emulator.base_url, "secret-check", 3))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "FLUX2_"))},
        "DAGSTER_HOME": str(home),
        "RUNCOMFY_BASE_URL": emulator.base_url,
        "RUNCOMFY_API_TOKEN": TEST_TOKEN,
        "FLUX2_LEDGER_URL": ledger_database,
        "FLUX2_INPUT_DIR": str(inputs),
        "FLUX2_OUTPUT_DIR": str(outputs),
        "FLUX2_STEP_RETRIES": "0",
    }
    ours = subprocess.run(
        [str(BIN / "flux2-pipeline"), "materialize"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ours.returncode == 0, ours.stdout + ours.stderr
    # Dagster's own CLI runs the step in a subprocess and captures its compute logs.
    theirs = subprocess.run(
        [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "flux2_pipeline.definitions",
            "--select",
            "flux2_edits",
            "--partition",
            "secret-check",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert theirs.returncode == 0, theirs.stdout[-3000:] + theirs.stderr[-3000:]
    assert emulator.state.counters.jobs_created == 3  # the second run paid for nothing

    compute_logs = [p for p in home.rglob("*") if p.suffix in (".out", ".err", ".complete")]
    assert compute_logs, "no compute logs were captured; the scan would prove nothing"
    seen_names = False
    for path, content in everything_under(home, outputs):
        assert TEST_TOKEN.encode() not in content, f"the API token is in {path}"
        assert PASSWORD.encode() not in content, f"the ledger password is in {path}"
        seen_names |= b"FLUX2_LEDGER_URL" in content and b"RUNCOMFY_API_TOKEN" in content
    # The decompressed snapshots hold the settings by name: the scan did look at them.
    assert seen_names
    for output in (ours.stdout, ours.stderr, theirs.stdout, theirs.stderr):
        assert TEST_TOKEN not in output and PASSWORD not in output
