"""The Dagster instance the command runs in: DAGSTER_HOME's, or one of its own."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from dagster import DagsterInstance
from filelock import FileLock

from flux2_pipeline.paths import is_local, local_path
from flux2_pipeline.settings import Settings

REMOTE_OUTPUT_HOMES = Path("~/.flux2-pipeline/dagster")
"""Where Dagster instances live when FLUX2_OUTPUT_DIR is an object store (one per URI)."""


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


def write_default_config(home: Path) -> None:
    """Give `home` a dagster.yaml with telemetry off, unless it has one."""
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")


def open_instance(settings: Settings) -> DagsterInstance:
    """DAGSTER_HOME's instance, or a persistent one at `default_dagster_home`.

    Creating an instance's SQLite storages is not safe from two processes at once (both
    run Alembic); a lock file in the folder makes the second wait for the first.
    """
    home = settings.dagster_home or default_dagster_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / ".flux2-setup.lock"):
        if settings.dagster_home is None:
            write_default_config(home)
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
