"""`flux2-pipeline ui`: the Dagster UI on the demo's folders, with a live emulator behind it
(no token; loopback), the demo's settings given to `dagster dev` alone. Ctrl+C stops both.

Example::

    $ flux2-pipeline demo && flux2-pipeline ui    # then open http://127.0.0.1:3000
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pyarrow.parquet as pq

from flux2_pipeline.cli.demo import MARKER, demo_folders, demo_settings, sample_tables, write_tables
from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.resources import SettingsError

STOP_SECONDS = 3.0
"""How long dagster dev's processes (and a run launched from the UI) have to end on their
SIGTERM before they are killed; a run cut short still has every job in the ledger."""


def _tables_point_at(folder: Path, base_url: str) -> bool:
    expected = sample_tables(base_url)
    for name, rows in expected.items():
        path = folder / f"{name}.parquet"
        if not path.is_file():
            return False
        written = pq.read_table(path).to_pylist()
        if [row.get("image_urls") for row in written] != [row["image_urls"] for row in rows]:
            return False
    return True


def _stop_group(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM `child`'s process group (dagster dev and each process it started shut down
    on it), wait until every process of the group is gone, SIGKILL what is left after
    `STOP_SECONDS`."""
    group = child.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline and _group_alive(group):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=0.1)
    if _group_alive(group):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    child.wait()


def _group_alive(group: int) -> bool:
    """Whether a process of the group still runs; a zombie waiting for its reaper does not.

    Where /proc is missing, any member counts, zombie or not.
    """
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    stats = list(Path("/proc").glob("[0-9]*/stat"))
    if not stats:
        return True
    for stat in stats:
        with contextlib.suppress(OSError):
            # After the command's name: state, parent, process group, ...
            state, _parent, member_of = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if member_of == str(group) and state != "Z":
                return True
    return False


def _ignore(_signal: int, _frame: FrameType | None) -> None:
    """A SIGINT handler that does nothing (unlike SIG_IGN, an exec does not pass it on)."""


@contextmanager
def _sigint_not_ignored_by_children() -> Iterator[None]:
    """Children started in this block get SIGINT's default disposition, not SIG_IGN.

    A command started in the background has SIGINT ignored, and every Dagster process
    maps SIGTERM to SIGINT's handler: inherited through the exec, SIG_IGN would make
    `dagster dev` and its children ignore SIGTERM too. A handler is reset by the exec.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    ):
        yield
        return
    signal.signal(signal.SIGINT, _ignore)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_ui(
    workdir: str | Path = "flux2-demo", *, port: int = 3000, emulator_port: int = 8188
) -> int:
    """Serve the UI until interrupted; returns the process exit code."""
    root = Path(workdir).absolute()
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise SettingsError(f"--workdir {root} was not made by the demo; choose another")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()
    inputs, outputs, home = demo_folders(root)
    config = EmulatorConfig(host="127.0.0.1", port=emulator_port, latency=0.5, max_concurrent=8)
    try:
        emulator = EmulatorServer(config)
        emulator.__enter__()
    except OSError as exc:
        raise SettingsError(f"--emulator-port: {exc}") from None
    try:
        if not _tables_point_at(inputs, emulator.base_url):
            write_tables(inputs, sample_tables(emulator.base_url))
        settings = demo_settings(root, emulator.base_url)  # makes the Dagster home
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "FLUX2_INPUT_DIR": settings.storage.input_dir,
            "FLUX2_OUTPUT_DIR": settings.storage.output_dir,
            "RUNCOMFY_BASE_URL": emulator.base_url,
        }
        env.pop("RUNCOMFY_API_TOKEN", None)
        env.pop("FLUX2_LEDGER_URL", None)
        print(f"emulator:  {emulator.base_url}")
        print(f"inputs:    {inputs}\noutputs:   {outputs}\nDAGSTER_HOME={home}")
        print(f"UI:        http://127.0.0.1:{port}  (Ctrl+C stops the UI and the emulator)")
        dagster = Path(sys.executable).parent / "dagster"
        command = [str(dagster), "dev", "-m", "flux2_pipeline.definitions"]
        command += ["-h", "127.0.0.1", "-p", str(port)]
        # Its own process group, so a stop can wait for the webserver and daemon it starts
        # (they outlive `dagster dev` itself by a moment) and never leave them behind.
        with _sigint_not_ignored_by_children():
            child = subprocess.Popen(command, env=env, start_new_session=True)
        # A SIGTERM to this process must not orphan dagster dev: stop it like Ctrl+C does.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return child.wait()
        except KeyboardInterrupt:
            _stop_group(child)
            return 0
    finally:
        emulator.__exit__(None, None, None)
