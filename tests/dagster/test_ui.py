"""`flux2-pipeline ui` (make ui): the emulator and `dagster dev` on the demo's folders.

Started on free loopback ports, the UI answers with the flux2 assets, the demo's prompt
tables point at the live emulator, and a SIGTERM stops everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from tests.helpers.cli import BIN, serves
from tests.helpers.net import free_port
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow


def test_the_ui_serves_the_demo_folders_and_stops_cleanly(tmp_path: Path) -> None:
    port, emulator_port = free_port(), free_port()
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "FLUX2_"))}
    env.pop("DAGSTER_HOME", None)
    process = subprocess.Popen(
        [
            str(BIN / "flux2-pipeline"),
            "ui",
            "--workdir",
            str(workdir),
            "--port",
            str(port),
            "--emulator-port",
            str(emulator_port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/server_info"
        wait_until(lambda: serves(url, process), url, timeout=240, interval=0.5)
        query = {"query": "{ assetNodes { assetKey { path } } }"}
        nodes = httpx.post(f"http://127.0.0.1:{port}/graphql", json=query, timeout=60).json()
        keys = {"/".join(n["assetKey"]["path"]) for n in nodes["data"]["assetNodes"]}
        assert {"flux2_edits", "flux2_images", "flux2_training_dataset"} <= keys
        assert (workdir / "dagster_home").is_dir()
        urls = pq.read_table(workdir / "prompts" / "city-at-night.parquet")["image_urls"]
        first = urls.to_pylist()[0][0]
        assert first.startswith(f"http://127.0.0.1:{emulator_port}/samples/")
        assert httpx.get(first, timeout=10).status_code == 200  # the emulator is live
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2)
