"""The emulator's dialect settings over real loopback HTTP: RunComfy's documented answers
(numeric codes, 400005, HTTP 200 error bodies, `succeeded`, extra states, error shapes,
`cost`), the model route, the balance route and a balance that runs out, the seed dialect,
the command line, and keep-alive. Bodies are checked against the real-dialect fixture
(tests/fixtures/runcomfy_bodies.json)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer, Faults
from flux2_pipeline.runcomfy.models import MODEL_PATH, PARAMETER_NAMES
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

FIXTURE = Path(__file__).parent.parent / "fixtures" / "runcomfy_bodies.json"
TOKEN = "dialect-token-7c1f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENDED = {"completed", "succeeded", "failed", "canceled", "cancelled"}


def fixture_body(name: str) -> dict[str, Any]:
    entries = json.loads(FIXTURE.read_text())["bodies"]
    (entry,) = [entry for entry in entries if entry["name"] == name]
    return dict(entry)


@pytest.fixture(scope="module")
def shared() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorConfig(port=0, seed=5)) as server:
        yield server


@pytest.fixture
def emulator(shared: EmulatorServer) -> EmulatorServer:
    """The shared emulator in the documented dialect, settings cleared, counters zeroed."""
    defaults = {**Faults().to_dict(), "seed": 5}
    shared.state.update_settings(
        {**defaults, "latency": 0.0, "max_concurrent": 8, "balance_usd": None}
    )
    shared.state.reset_counters()
    return shared


@pytest.fixture
def client(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, timeout=10) as c:
        yield c


def body(base_url: str, **overrides: Any) -> dict[str, Any]:
    return {"prompt": "make it night", "image_urls": [f"{base_url}/samples/cat.png"], **overrides}


def submit(client: httpx.Client, base_url: str, **overrides: Any) -> str:
    response = client.post(MODEL_PATH, json=body(base_url, **overrides))
    assert response.status_code == 202, response.text
    request_id: str = response.json()["request_id"]
    return request_id


def wait_ended(client: httpx.Client, request_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The first `/status` answer that says the job ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = client.get(f"/v1/requests/{request_id}/status").json()
        if status.get("status") in ENDED:
            return status
        time.sleep(0.01)
    raise AssertionError(f"job {request_id} did not end in {timeout} s")


def test_the_fixture_names_a_source_for_every_body() -> None:
    entries = json.loads(FIXTURE.read_text())["bodies"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)) and len(names) >= 30
    for entry in entries:
        assert entry["source"].strip(), entry["name"]
        assert entry["endpoint"] in {"submit", "status", "result", "cancel", "model", "balance"}
        assert isinstance(entry["http_status"], int)
        assert isinstance(entry["body"], dict)


def test_a_submit_answers_202_in_queue_as_runcomfy_does(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    real = fixture_body("submit_accepted")
    response = client.post(MODEL_PATH, json=body(emulator.base_url))
    assert response.status_code == real["http_status"] == 202
    answer = response.json()
    assert set(real["body"]) <= set(answer)
    assert answer["status"] == real["body"]["status"] == "in_queue"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,128}", answer["request_id"])
    assert {"status_url", "result_url", "cancel_url"} <= set(answer)


def test_result_answers_400005_until_the_job_has_ended(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    emulator.state.update_settings({"hold_jobs": True, "max_concurrent": 1})
    try:
        running = submit(client, emulator.base_url, seed=1)
        queued = submit(client, emulator.base_url, seed=2)
        wait_until(lambda: emulator.state.in_progress == 1, timeout=30.0)
        for request_id in (running, queued):
            answer = client.get(f"/v1/requests/{request_id}/result")
            assert answer.status_code == fixture_body("result_not_ready")["http_status"] == 400
            assert answer.json()["error_code"] == 400005
            assert isinstance(answer.json()["error_message"], str)
    finally:
        emulator.state.update_settings({"hold_jobs": False})
    assert emulator.state.counters.results_not_ready == 2
    wait_ended(client, running)
    done = client.get(f"/v1/requests/{running}/result")
    assert done.status_code == 200 and done.json()["status"] == "succeeded"


def test_result_lag_keeps_400005_after_status_says_the_job_ended(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    lag = 0.6
    emulator.state.faults.update(result_lag=lag)
    request_id = submit(client, emulator.base_url)
    ended = wait_ended(client, request_id)
    assert ended["status"] == "completed"
    seen_ended = time.monotonic()
    lagging = client.get(f"/v1/requests/{request_id}/result")
    # Only a bound from below: a slow machine may take longer than the lag to get here.
    if time.monotonic() - seen_ended < lag:
        assert lagging.status_code == 400 and lagging.json()["error_code"] == 400005
        assert emulator.state.counters.results_not_ready >= 1
    finished = emulator.state.jobs[request_id].finished_at
    assert finished is not None
    wait_until(lambda: time.time() - finished.timestamp() > lag + 0.05, timeout=30.0)
    ready = client.get(f"/v1/requests/{request_id}/result")
    assert ready.status_code == 200 and ready.json()["status"] == "succeeded"


def test_a_fault_200_error_answers_polls_with_http_200_and_500001_and_changes_nothing(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    request_id = submit(client, emulator.base_url)
    wait_ended(client, request_id)
    emulator.state.faults.update(fault_200_error=1.0)
    real = fixture_body("poll_error_http_200")
    for path in ("status", "result"):
        answer = client.get(f"/v1/requests/{request_id}/{path}")
        assert answer.status_code == real["http_status"] == 200
        assert answer.json()["error_code"] == real["body"]["error_code"] == 500001
        assert set(answer.json()) == set(real["body"])
    assert emulator.state.counters.errors_200 == 2
    # Submits and cancels are not polls: they are answered as usual.
    assert client.post(MODEL_PATH, json=body(emulator.base_url, seed=9)).status_code == 202
    assert client.post(f"/v1/requests/{request_id}/cancel").json()["outcome"] == "not_cancellable"
    emulator.state.faults.update(fault_200_error=0.0)
    assert client.get(f"/v1/requests/{request_id}/result").json()["status"] == "succeeded"


def test_succeeded_rate_decides_what_status_says_and_result_always_says_succeeded(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    emulator.state.faults.update(succeeded_rate=0.5)
    ids = [submit(client, emulator.base_url, seed=i) for i in range(24)]
    words = [wait_ended(client, request_id)["status"] for request_id in ids]
    assert set(words) == {"completed", "succeeded"}  # seeded: both occur in 24 draws
    for request_id, word in zip(ids, words, strict=True):
        again = client.get(f"/v1/requests/{request_id}/status").json()["status"]
        assert again == word  # drawn once per job, not per poll
        assert client.get(f"/v1/requests/{request_id}/result").json()["status"] == "succeeded"
    emulator.state.faults.update(succeeded_rate=1.0)
    assert wait_ended(client, submit(client, emulator.base_url, seed=99))["status"] == "succeeded"


def test_extra_states_say_pending_waiting_starting_processing_some_of_the_time(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    emulator.state.update_settings({"hold_jobs": True, "max_concurrent": 1, "extra_states": True})
    try:
        running = submit(client, emulator.base_url, seed=1)
        queued = submit(client, emulator.base_url, seed=2)
        wait_until(lambda: emulator.state.in_progress == 1, timeout=30.0)
        seen_running = {client.get(f"/v1/requests/{running}/status").json()["status"]}
        seen_queued = {client.get(f"/v1/requests/{queued}/status").json()["status"]}
        for _ in range(40):
            seen_running.add(client.get(f"/v1/requests/{running}/status").json()["status"])
            seen_queued.add(client.get(f"/v1/requests/{queued}/status").json()["status"])
    finally:
        emulator.state.update_settings({"hold_jobs": False})
    assert seen_running == {"in_progress", "starting", "processing"}
    assert seen_queued == {"in_queue", "pending", "waiting"}
    for word in ("pending", "waiting", "starting", "processing"):
        assert fixture_body(f"status_{word}")["body"]["status"] == word


@pytest.mark.parametrize("shape", ["string", "object", "list"])
def test_a_failed_job_reports_its_error_in_each_shape(
    emulator: EmulatorServer, client: httpx.Client, shape: str
) -> None:
    emulator.state.faults.update(error_shape=shape, fail_next=1)
    model_failed = submit(client, emulator.base_url, seed=1)
    gone = f"{emulator.base_url}/v1/outputs/none/0.png"
    unloadable = submit(client, emulator.base_url, image_urls=[gone], seed=2)
    expected = {
        model_failed: "Model run failed",
        unloadable: f"failed to load image from {gone}: the server answered HTTP 404",
    }
    for request_id, message in expected.items():
        status = wait_ended(client, request_id)
        result = client.get(f"/v1/requests/{request_id}/result").json()
        assert status["status"] == result["status"] == "failed"
        assert status["error"] == result["error"]
        if shape == "string":
            assert status["error"] == message
        elif shape == "object":
            assert status["error"] == {"error_code": 500001, "error_message": message}
        else:
            assert status["error"] == [message]
    real = fixture_body(f"status_failed_{shape}_error")["body"]["error"]
    assert type(real) is type(wait_ended(client, model_failed)["error"])


def test_cost_is_the_price_times_the_images_with_include_cost(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    emulator.state.faults.update(price_usd=0.03)
    request_id = submit(client, emulator.base_url, num_images=2)
    wait_ended(client, request_id)
    plain = client.get(f"/v1/requests/{request_id}/result").json()
    costed = client.get(f"/v1/requests/{request_id}/result?include_cost=true").json()
    assert "cost" not in plain
    assert isinstance(costed["cost"], float) and costed["cost"] == pytest.approx(0.06)
    real = fixture_body("result_succeeded_with_cost")["body"]
    assert set(real) <= set(costed) and costed["status"] == real["status"]
    assert isinstance(costed["output"]["images"], list)
    assert emulator.state.counters.charged_microdollars == 60_000


def test_the_model_route_gives_price_unit_and_the_input_schema(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    answer = client.get(MODEL_PATH)
    assert answer.status_code == 200
    model = answer.json()
    real = fixture_body("model")["body"]
    assert set(real) <= set(model)
    assert model["model_id"] == "blackforestlabs/flux-2/dev/edit"
    assert model["categories"] == ["image-to-image"] and model["price_unit"] == "image"
    assert model["base_price_usd"] == 0.025 and model["display_name"]
    schema = model["input_schema"]
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"prompt", "image_urls", *PARAMETER_NAMES}
    assert schema["required"] == ["prompt", "image_urls"]
    assert schema["properties"]["image_urls"]["maxItems"] == 3
    assert schema["properties"]["num_images"] == {
        "default": 1,
        "maximum": 4,
        "minimum": 1,
        "title": "Num Images",
        "type": "integer",
    }

    emulator.state.faults.update(price_usd=0.04)
    assert client.get(MODEL_PATH).json()["base_price_usd"] == 0.04
    emulator.state.faults.update(model_route="missing")
    missing = client.get(MODEL_PATH)
    assert missing.status_code == 404 and missing.json()["error_code"] == 404001
    emulator.state.faults.update(model_route="error")
    failing = client.get(MODEL_PATH)
    assert failing.status_code == 500 and failing.json()["error_code"] == 500001
    assert emulator.state.counters.model_calls == 4
    assert emulator.state.counters.submits_total == 0


def test_another_model_id_answers_400001_and_creates_no_job(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    for method in ("POST", "GET"):
        answer = client.request(
            method, "/v1/models/blackforestlabs/flux-2/pro/edit", json=body(emulator.base_url)
        )
        assert answer.status_code == 400 and answer.json()["error_code"] == 400001
    assert emulator.state.counters.rejected_400001 == 2
    assert emulator.state.counters.jobs_created == 0


def test_the_emulator_never_redirects(emulator: EmulatorServer, client: httpx.Client) -> None:
    request_id = submit(client, emulator.base_url)
    for path in (f"/v1/requests/{request_id}/status/", "/prod/v2/balance/", "/samples/a.png/"):
        answer = client.get(path)
        assert answer.status_code == 404 and "location" not in answer.headers


def test_account_routes_need_the_token_and_answer_each_route_setting() -> None:
    config = EmulatorConfig(port=0, token=TOKEN, balance_usd=5)
    with EmulatorServer(config) as server, httpx.Client(base_url=server.base_url) as client:
        for path in ("/prod/v2/balance", MODEL_PATH):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.json()["error_code"] == 400004
        client.headers.update(AUTH)
        real = fixture_body("balance")
        answer = client.get("/prod/v2/balance")
        assert answer.status_code == 200 and answer.json() == real["body"]
        expected = {
            "missing": (404, 404001),
            "error": (500, 500001),
            "denied": (200, 403003),
        }
        for route, (http_status, code) in expected.items():
            server.state.faults.update(balance_route=route)
            answer = client.get("/prod/v2/balance")
            assert (answer.status_code, answer.json()["error_code"]) == (http_status, code)
        denied = fixture_body("balance_denied_http_200")
        assert (denied["http_status"], denied["body"]["error_code"]) == (200, 403003)
        assert server.state.counters.balance_calls == 5


def test_no_balance_kept_reports_a_large_fixed_balance(client: httpx.Client) -> None:
    assert client.get("/prod/v2/balance").json() == {
        "balance_usd": 1000.0,
        "balance_microdollars": 1_000_000_000,
        "currency": "USD",
    }


@pytest.mark.parametrize("http_200", [False, True])
def test_a_balance_for_ten_jobs_refuses_the_eleventh_with_400002(http_200: bool) -> None:
    config = EmulatorConfig(
        port=0, balance_usd=0.25, price_usd=0.025, balance_error_http_200=http_200
    )
    with EmulatorServer(config) as server, httpx.Client(base_url=server.base_url) as client:
        server.state.faults.update(hold_jobs=True)  # all ten still running: reserved, unpaid
        try:
            ids = [submit(client, server.base_url, seed=i) for i in range(10)]
            refused = [
                client.post(MODEL_PATH, json=body(server.base_url, seed=10 + i)) for i in range(3)
            ]
        finally:
            server.state.faults.update(hold_jobs=False)
        real = fixture_body(
            "submit_insufficient_resources_http_200"
            if http_200
            else "submit_insufficient_resources"
        )
        for answer in refused:
            assert answer.status_code == real["http_status"] == (200 if http_200 else 400)
            assert answer.json() == real["body"]
        counters = server.state.counters
        assert counters.jobs_created == 10 and counters.rejected_400002 == 3
        assert counters.submits_total == 13
        for request_id in ids:
            wait_ended(client, request_id)
        balance = client.get("/prod/v2/balance").json()
        assert balance == {"balance_usd": 0.0, "balance_microdollars": 0, "currency": "USD"}
        assert counters.charged_microdollars == 250_000

        topped = client.post("/_emulator/faults", json={"balance_usd": 0.05})
        assert topped.json()["balance_usd"] == 0.05
        more = [client.post(MODEL_PATH, json=body(server.base_url, seed=20 + i)) for i in range(3)]
        assert [answer.status_code for answer in more] == [202, 202, 200 if http_200 else 400]


def test_a_job_cancelled_or_failed_gives_its_reservation_back() -> None:
    config = EmulatorConfig(port=0, balance_usd=0.05, price_usd=0.025, max_concurrent=1)
    with EmulatorServer(config) as server, httpx.Client(base_url=server.base_url) as client:
        server.state.faults.update(hold_jobs=True)
        try:
            running = submit(client, server.base_url, seed=1)
            queued = submit(client, server.base_url, seed=2)
            full = client.post(MODEL_PATH, json=body(server.base_url, seed=3))
            assert full.status_code == 400 and full.json()["error_code"] == 400002
            cancel = client.post(f"/v1/requests/{queued}/cancel").json()
            assert cancel == {"request_id": queued, "status": "canceled", "outcome": "cancelled"}
            assert server.state.settings()["reserved_usd"] == 0.025
            gone = f"{server.base_url}/v1/outputs/none/0.png"
            failing = submit(client, server.base_url, image_urls=[gone])  # the cancel made room
        finally:
            server.state.faults.update(hold_jobs=False)
        wait_ended(client, running)
        assert wait_ended(client, failing)["status"] == "failed"
        assert server.state.balance_usd == 0.025  # only the completed job was charged
        assert server.state.settings()["reserved_usd"] == 0.0
        too_many = client.post(MODEL_PATH, json=body(server.base_url, num_images=2, seed=5))
        assert too_many.status_code == 400 and too_many.json()["error_code"] == 400002
        assert server.state.counters.jobs_created == 3


@pytest.mark.parametrize("amount", [0, -1])
def test_a_zero_or_negative_balance_is_reported_and_refuses_submits(amount: int) -> None:
    with (
        EmulatorServer(EmulatorConfig(port=0, balance_usd=amount)) as server,
        httpx.Client(base_url=server.base_url) as client,
    ):
        real = fixture_body("balance_zero" if amount == 0 else "balance_negative")["body"]
        assert client.get("/prod/v2/balance").json() == real
        refused = client.post(MODEL_PATH, json=body(server.base_url))
        assert refused.status_code == 400 and refused.json()["error_code"] == 400002
        assert server.state.counters.jobs_created == 0


def test_error_bodies_carry_runcomfys_numeric_codes(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    not_found = client.get("/v1/requests/nope/status")
    real_404 = fixture_body("status_request_not_found")
    assert not_found.status_code == real_404["http_status"]
    assert (
        set(not_found.json()) == set(real_404["body"]) and not_found.json()["error_code"] == 404001
    )
    invalid = client.post(MODEL_PATH, json={"image_urls": [f"{emulator.base_url}/samples/a.png"]})
    real_422 = fixture_body("submit_validation_error")
    assert invalid.status_code == real_422["http_status"]
    assert set(invalid.json()) == set(real_422["body"]) and invalid.json()["error_code"] == 422001
    assert invalid.json()["detail"][0]["loc"] == ["body", "prompt"]
    emulator.state.faults.update(fault_429=1.0, retry_after="0.01")
    limited = client.get("/v1/requests/nope/status")
    assert limited.status_code == 429 and limited.json()["error_code"] == 429001
    for answer in (not_found, invalid, limited):
        assert isinstance(answer.json()["error_code"], int)
        assert isinstance(answer.json()["error_message"], str)


def test_the_seed_dialect_keeps_the_old_answers(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    emulator.state.faults.update(dialect="seed", succeeded_rate=1.0, result_lag=30, fail_next=1)
    emulator.state.update_settings({"hold_jobs": True, "max_concurrent": 1})
    try:
        submitted = client.post(MODEL_PATH, json=body(emulator.base_url, seed=1))
        assert submitted.status_code == 200 and "status" not in submitted.json()
        failing = submitted.json()["request_id"]
        queued = client.post(MODEL_PATH, json=body(emulator.base_url, seed=2)).json()["request_id"]
        cancelled = client.post(MODEL_PATH, json=body(emulator.base_url, seed=3)).json()
        unfinished = client.get(f"/v1/requests/{queued}/result")
        assert unfinished.status_code == 200 and unfinished.json()["status"] == "in_queue"
        cancel = client.post(f"/v1/requests/{cancelled['request_id']}/cancel").json()
        assert cancel["status"] == "cancelled" and cancel["outcome"] == "cancelled"
    finally:
        emulator.state.update_settings({"hold_jobs": False})
    failed = wait_ended(client, failing)
    assert failed == {"request_id": failing, "status": "failed"}
    assert client.get(f"/v1/requests/{failing}/result").json()["error"] == {
        "error_code": "MODEL_ERROR",
        "error_message": "the model failed on this input (emulated)",
    }
    assert wait_ended(client, queued)["status"] == "completed"  # succeeded_rate: documented only
    costed = client.get(f"/v1/requests/{queued}/result?include_cost=true").json()
    assert costed["status"] == "completed" and costed["cost_usd"] == 0.025 and "cost" not in costed
    assert client.get("/v1/requests/nope/status").json()["error_code"] == "NOT_FOUND"


def test_runtime_settings_are_validated(emulator: EmulatorServer, client: httpx.Client) -> None:
    for change in (
        {"dialect": "klingon"},
        {"error_shape": "xml"},
        {"balance_route": "maybe"},
        {"fault_200_error": 1.5},
        {"result_lag": -1},
        {"extra_states": "yes"},
        {"price_usd": -0.1},
        {"balance_usd": "lots"},
    ):
        refused = client.post("/_emulator/faults", json=change)
        assert refused.status_code == 422, change
    assert emulator.state.faults.dialect == "documented"
    assert emulator.state.balance_usd is None
    changed = client.post("/_emulator/faults", json={"dialect": "seed", "balance_usd": 1.5})
    assert changed.json()["dialect"] == "seed" and changed.json()["balance_usd"] == 1.5
    with pytest.raises(ValueError, match="dialect must be one of documented, seed"):
        Faults(dialect="other")


def test_keep_alive_closes_idle_connections_after_its_seconds() -> None:
    with EmulatorServer(EmulatorConfig(port=0, keep_alive=0.3)) as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /samples/cat.png HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            assert received.startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            while sock.recv(65536):  # the rest of the body, then the server's close
                assert time.monotonic() - started < 10
            assert time.monotonic() - started >= 0.25


def test_the_cli_flags_reach_the_emulator() -> None:
    command = [
        sys.executable,
        "-c",
        "import sys; from flux2_pipeline.cli import main; main(sys.argv[1:])",
        "emulator",
        "--port",
        "0",
        "--dialect",
        "seed",
        "--fault-200-error",
        "0.1",
        "--result-lag",
        "2",
        "--succeeded-rate",
        "0.5",
        "--extra-states",
        "--error-shape",
        "object",
        "--price-usd",
        "0.05",
        "--model-route",
        "error",
        "--balance-usd",
        "0.5",
        "--balance-route",
        "denied",
        "--balance-error-http-200",
        "--keep-alive",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            base_url = line.strip().rsplit(" ", 1)[-1]
            assert base_url.startswith("http://127.0.0.1:"), line
            settings = httpx.get(f"{base_url}/_emulator/stats", timeout=10).json()["settings"]
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(20)
    assert process.returncode == 0
    expected = {
        "dialect": "seed",
        "fault_200_error": 0.1,
        "result_lag": 2.0,
        "succeeded_rate": 0.5,
        "extra_states": True,
        "error_shape": "object",
        "price_usd": 0.05,
        "model_route": "error",
        "balance_usd": 0.5,
        "balance_route": "denied",
        "balance_error_http_200": True,
    }
    assert {name: settings[name] for name in expected} == expected
