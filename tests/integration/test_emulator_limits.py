"""The emulator with --token guards its control routes too, and bounds what it holds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.runcomfy.models import MODEL_PATH

TOKEN = "emulator-secret-5d1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(
        port=0,
        token=TOKEN,
        latency=30.0,
        max_concurrent=1,
        max_queue=2,
        max_body_bytes=4096,
        max_tracked_bodies=3,
        retry_after="0.5",
    )
    with EmulatorServer(config) as running:
        yield running


def body(base_url: str, prompt: str = "night") -> dict[str, Any]:
    return {"prompt": prompt, "image_urls": [f"{base_url}/samples/cat.png"]}


def test_control_routes_need_the_token(server: EmulatorServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=10) as anonymous:
        refused = anonymous.get("/_emulator/stats")
        assert refused.status_code == 401 and refused.json()["error_code"] == 400004
        assert anonymous.post("/_emulator/faults", json={"fault_429": 1}).status_code == 401
        assert anonymous.post("/_emulator/reset").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert anonymous.get("/_emulator/stats", headers=wrong).status_code == 401
    assert server.state.faults.fault_429 == 0  # the refused change did not apply
    assert server.state.counters.rejected_control_401 == 4
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=10) as admin:
        assert admin.get("/_emulator/stats").json()["rejected_control_401"] == 4
        assert admin.post("/_emulator/faults", json={"fail_rate": 0.5}).status_code == 200
        assert admin.post("/_emulator/reset").json()["rejected_control_401"] == 0
    assert server.state.faults.fail_rate == 0.5


def test_a_body_over_the_limit_is_refused_without_being_read(server: EmulatorServer) -> None:
    huge = {"prompt": "x" * 10_000, "image_urls": [f"{server.base_url}/samples/a.png"]}

    def streamed() -> Iterator[bytes]:  # no Content-Length: the cap holds while reading
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"y" * 1000
        yield b'", "image_urls": []}'

    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=10) as client:
        declared = client.post(MODEL_PATH, json=huge)
        chunked = client.post(MODEL_PATH, content=streamed())
        faults = client.post("/_emulator/faults", content=b"{" + b" " * 5000 + b"}")
    for answer in (declared, chunked, faults):
        assert answer.status_code == 413
        assert answer.json()["error_code"] == 413001
    assert server.state.counters.jobs_created == 0


def test_a_full_queue_answers_429_with_retry_after_and_creates_no_job(
    server: EmulatorServer,
) -> None:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=10) as client:
        accepted = [client.post(MODEL_PATH, json=body(server.base_url, f"p{i}")) for i in range(3)]
        refused = client.post(MODEL_PATH, json=body(server.base_url, "p3"))
    assert [a.status_code for a in accepted] == [202, 202, 202]  # 1 running + 2 queued
    assert refused.status_code == 429 and refused.headers["retry-after"] == "0.5"
    assert refused.json()["error_code"] == 429001
    counters = server.state.counters
    assert (counters.jobs_created, counters.rejected_queue_full) == (3, 1)
    assert server.state.queue_length == 2


def test_body_hashes_kept_for_duplicate_counting_are_bounded(server: EmulatorServer) -> None:
    server.state.update_settings({"max_concurrent": 10})
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=10) as client:
        for i in range(5):
            assert client.post(MODEL_PATH, json=body(server.base_url, f"q{i}")).status_code == 202
        client.post(MODEL_PATH, json=body(server.base_url, "q4"))
    counters = server.state.counters
    assert len(counters.body_submissions) == 3 and counters.forgotten_bodies == 2
    assert counters.duplicate_bodies == 1
