"""The emulator over real loopback HTTP: API shapes, queue model, auth, validation,
rendered outputs, faults and counters, in RunComfy's documented dialect (the default).
The dialect's own settings (seed dialect, 400005, HTTP 200 errors, prices, the balance)
are in test_emulator_dialect.py."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
import pytest
from PIL import Image

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer, Faults
from flux2_pipeline.runcomfy.models import (
    MODEL_PATH,
    JobState,
    parse_cancel,
    parse_result,
    parse_status,
    parse_submit,
)
from tests.helpers.net import refused_port
from tests.helpers.waiting import wait_until

TERMINAL = {"completed", "succeeded", "failed", "canceled"}


@pytest.fixture(scope="module")
def shared() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorConfig(port=0, seed=11)) as server:
        yield server


@pytest.fixture
def emulator(shared: EmulatorServer) -> EmulatorServer:
    """The shared zero-latency emulator with faults cleared and counters zeroed."""
    shared.state.faults.update(
        fault_429=0,
        fault_5xx=0,
        fail_rate=0,
        submit_delay=0,
        drop_submits=0,
        seed=11,
        fault_5xx_on_submit=True,
        hold_submits=False,
        hold_jobs=False,
        dialect="documented",
        fault_200_error=0,
        result_lag=0,
        succeeded_rate=0,
        extra_states=False,
        error_shape="string",
        price_usd=EmulatorConfig().price_usd,
    )
    shared.state.reset_counters()
    return shared


@pytest.fixture
def client(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, timeout=10) as c:
        yield c


def body(base_url: str, **overrides: Any) -> dict[str, Any]:
    return {"prompt": "make it night", "image_urls": [f"{base_url}/samples/cat.png"], **overrides}


def wait_done(client: httpx.Client, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/requests/{request_id}/status").json()
        if status["status"] in TERMINAL:
            result: dict[str, Any] = client.get(f"/v1/requests/{request_id}/result").json()
            return result
        time.sleep(0.01)
    raise AssertionError(f"job {request_id} did not finish in {timeout} s")


def test_submit_status_result_shapes(emulator: EmulatorServer, client: httpx.Client) -> None:
    response = client.post(MODEL_PATH, json=body(emulator.base_url, num_images=2))
    assert response.status_code == 202
    handle = response.json()
    rid = handle["request_id"]
    assert len(rid) == 36 and rid.count("-") == 4
    assert handle == {
        "request_id": rid,
        "status": "in_queue",
        "status_url": f"{emulator.base_url}/v1/requests/{rid}/status",
        "result_url": f"{emulator.base_url}/v1/requests/{rid}/result",
        "cancel_url": f"{emulator.base_url}/v1/requests/{rid}/cancel",
    }
    result = wait_done(client, rid)
    assert set(result) == {"request_id", "status", "output", "error", "created_at", "finished_at"}
    assert result["status"] == "succeeded" and result["error"] is None
    assert len(result["output"]["images"]) == 2
    created = datetime.fromisoformat(result["created_at"])
    finished = datetime.fromisoformat(result["finished_at"])
    assert created.utcoffset() is not None and finished >= created
    costed = client.get(f"/v1/requests/{rid}/result", params={"include_cost": "true"}).json()
    assert costed["cost"] == pytest.approx(0.05) and "cost_usd" not in costed
    assert "cost" not in result
    status = client.get(f"/v1/requests/{rid}/status").json()
    assert status == {"request_id": rid, "status": "completed"}


def test_queue_positions_latency_and_cancel() -> None:
    latency = 0.4
    config = EmulatorConfig(port=0, latency=latency, max_concurrent=2)
    with EmulatorServer(config) as server, httpx.Client(base_url=server.base_url) as client:
        # Held, the first wave cannot finish while the queue is read, however slow we are.
        server.state.faults.update(hold_jobs=True)
        ids = [
            client.post(MODEL_PATH, json=body(server.base_url, seed=i)).json()["request_id"]
            for i in range(5)
        ]
        statuses = [client.get(f"/v1/requests/{rid}/status").json() for rid in ids]
        assert [s["status"] for s in statuses] == ["in_progress"] * 2 + ["in_queue"] * 3
        assert [s.get("queue_position") for s in statuses] == [None, None, 0, 1, 2]

        running = client.post(f"/v1/requests/{ids[0]}/cancel").json()
        assert running == {
            "request_id": ids[0],
            "status": "in_progress",
            "outcome": "not_cancellable",
        }
        queued = client.post(f"/v1/requests/{ids[3]}/cancel").json()
        assert queued == {"request_id": ids[3], "status": "canceled", "outcome": "cancelled"}
        assert client.get(f"/v1/requests/{ids[3]}/status").json()["status"] == "canceled"
        assert client.get(f"/v1/requests/{ids[4]}/status").json()["queue_position"] == 1
        pending = client.get(f"/v1/requests/{ids[2]}/result")
        assert pending.status_code == 400 and pending.json()["error_code"] == 400005

        server.state.faults.update(hold_jobs=False)
        results = [wait_done(client, rid, timeout=60) for rid in ids]
        assert [r["status"] for r in results] == ["succeeded"] * 3 + ["canceled", "succeeded"]
        done = client.post(f"/v1/requests/{ids[0]}/cancel").json()
        assert done["outcome"] == "not_cancellable" and done["status"] == "completed"

        # The waves, from the emulator's own clock: no job ran shorter than the latency,
        # jobs started in submit order, and each second-wave job started only once a slot
        # was given back. Only lower bounds: a slow machine makes everything later.
        jobs = [server.state.jobs[rid] for rid in ids]
        assert jobs[3].started_at is None  # cancelled while queued: it never ran
        ran = [(job.started_at, job.finished_at) for job in (jobs[0], jobs[1], jobs[2], jobs[4])]
        starts = [start for start, _ in ran if start is not None]
        ends = [end for _, end in ran if end is not None]
        assert len(starts) == len(ends) == 4
        for start, end in zip(starts, ends, strict=True):
            assert (end - start).total_seconds() >= latency - 0.01
        assert starts == sorted(starts)
        # With two slots, the third job to start waited for the first job to end, the
        # fourth for the second: the emulator never ran more than two at once.
        first_ends = sorted(ends)
        assert starts[2] >= first_ends[0] and starts[3] >= first_ends[1]
        # Two waves of at least the latency each, end to end.
        assert (ends[3] - starts[0]).total_seconds() >= 2 * latency - 0.01
        counters = server.state.counters
        assert counters.max_in_progress == 2
        assert counters.max_queue_length == 3
        assert counters.cancelled_jobs == 1 and counters.completed_jobs == 4
        assert counters.in_progress_now == 0


def test_bearer_auth_and_token_never_echoed() -> None:
    config = EmulatorConfig(port=0, token="s3cret-token")
    with EmulatorServer(config) as server, httpx.Client(base_url=server.base_url) as client:
        wrong = "wrong-token-value-xyz"
        for headers in (
            {},
            {"Authorization": f"Bearer {wrong}"},
            {"Authorization": "s3cret-token"},
        ):
            response = client.post(MODEL_PATH, json=body(server.base_url), headers=headers)
            assert response.status_code == 401
            assert response.json() == {
                "error_code": 400004,
                "error_message": "missing or invalid API token",
            }
            assert wrong not in response.text and "s3cret" not in response.text
        assert client.get("/v1/requests/x/status").status_code == 401
        assert server.state.counters.jobs_created == 0
        assert "s3cret" not in repr(config)

        auth = {"Authorization": "Bearer s3cret-token"}
        rid = client.post(MODEL_PATH, json=body(server.base_url), headers=auth).json()["request_id"]
        client.headers.update(auth)
        result = wait_done(client, rid)
        # Output images and samples are CDN-like: no token needed.
        image = httpx.get(result["output"]["images"][0])
        assert image.status_code == 200
        assert httpx.get(f"{server.base_url}/samples/cat.png").status_code == 200


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prompt": None}, "prompt"),
        ({"image_urls": ["https://x.test/a.png"] * 4}, "image_urls"),
        ({"image_urls": ["ftp://x.test/a.png"]}, "image_urls"),
        ({"num_images": 5}, "num_images"),
        ({"guidance_scale": 25}, "guidance_scale"),
        ({"image_size": "huge"}, "image_size"),
        ({"colour": "red"}, "colour"),
        ({"warnings": ["x"]}, "warnings"),
    ],
)
def test_invalid_bodies_get_422(
    emulator: EmulatorServer, client: httpx.Client, overrides: dict[str, Any], field: str
) -> None:
    payload = body(emulator.base_url, **overrides)
    payload = {key: value for key, value in payload.items() if value is not None}
    response = client.post(MODEL_PATH, json=payload)
    assert response.status_code == 422
    data = response.json()
    assert data["error_code"] == 422001
    assert field in data["error_message"]
    assert [entry["loc"][:2] for entry in data["detail"]] == [["body", field]]
    assert all(entry["msg"] and entry["type"] for entry in data["detail"])
    assert emulator.state.counters.jobs_created == 0


def test_malformed_json_gets_422(client: httpx.Client) -> None:
    response = client.post(MODEL_PATH, content=b"{not json", headers={"content-type": "json"})
    assert response.status_code == 422
    assert response.json()["error_code"] == 422001
    assert response.json()["detail"][0]["loc"] == ["body"]


def test_unknown_ids_get_404(client: httpx.Client) -> None:
    for method, path in (("GET", "status"), ("GET", "result"), ("POST", "cancel")):
        response = client.request(method, f"/v1/requests/nope/{path}")
        assert response.status_code == 404
        assert response.json()["error_code"] == 404001
    assert client.get("/v1/outputs/nope/0.png").status_code == 404
    assert client.get("/samples/Bad Name.png").status_code == 404
    unknown = client.get("/v2/nothing")
    assert unknown.status_code == 404 and unknown.json()["error_code"] == 404001
    wrong_method = client.put(MODEL_PATH)
    assert wrong_method.status_code == 405 and wrong_method.json()["error_code"] == 405001


@pytest.mark.parametrize(
    ("image_size", "output_format", "pillow_format", "size"),
    [
        ("square", "png", "PNG", (512, 512)),
        ("portrait_16_9", "jpeg", "JPEG", (576, 1024)),
        ("landscape_4_3", "webp", "WEBP", (1024, 768)),
    ],
)
def test_output_images_decode_at_preset_size(
    emulator: EmulatorServer,
    client: httpx.Client,
    image_size: str,
    output_format: str,
    pillow_format: str,
    size: tuple[int, int],
) -> None:
    refs = [f"{emulator.base_url}/samples/{name}.png" for name in ("cat", "dog", "sun")]
    payload = body(
        emulator.base_url,
        image_urls=refs,
        image_size=image_size,
        output_format=output_format,
        num_images=3,
        seed=5,
    )
    results = [
        wait_done(client, client.post(MODEL_PATH, json=payload).json()["request_id"])
        for _ in range(2)
    ]
    contents = []
    for result in results:
        urls = result["output"]["images"]
        assert len(urls) == 3 and all(url.endswith(f".{output_format}") for url in urls)
        images = [client.get(url) for url in urls]
        for response in images:
            assert response.headers["content-type"] == f"image/{output_format}"
            decoded = Image.open(io.BytesIO(response.content))
            assert decoded.format == pillow_format and decoded.size == size
        contents.append([response.content for response in images])
    assert contents[0] == contents[1], "identical jobs must render identical bytes"
    assert len(set(contents[0])) == 3, "each index is a different edit"
    assert client.get(urls[0].replace("/0.", "/7.")).status_code == 404


def test_sample_images(client: httpx.Client) -> None:
    first, again = client.get("/samples/beach_01.png"), client.get("/samples/beach_01.png")
    other = client.get("/samples/forest.png")
    assert first.headers["content-type"] == "image/png"
    assert first.content == again.content != other.content
    assert Image.open(io.BytesIO(first.content)).size == (512, 512)


def test_unusable_references_fail_the_job(emulator: EmulatorServer, client: httpx.Client) -> None:
    dead = f"http://127.0.0.1:{refused_port()}/gone.png"
    not_image = f"{emulator.base_url}/_emulator/stats"
    missing = f"{emulator.base_url}/v1/outputs/none/0.png"
    for url, reason in (
        (dead, "unreachable"),
        (not_image, "not a decodable image"),
        (missing, "HTTP 404"),
    ):
        payload = body(emulator.base_url, image_urls=[f"{emulator.base_url}/samples/a.png", url])
        rid = client.post(MODEL_PATH, json=payload).json()["request_id"]
        result = wait_done(client, rid)
        assert result["status"] == "failed" and result["output"] is None
        assert result["error"].startswith(f"failed to load image from {url}: ")
        assert reason in result["error"]
        status = client.get(f"/v1/requests/{rid}/status").json()
        assert status == {"request_id": rid, "status": "failed", "error": result["error"]}


def test_fault_429_sets_retry_after_and_creates_no_job(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    emulator.state.faults.update(fault_429=1.0, retry_after="0.05")
    response = client.post(MODEL_PATH, json=body(emulator.base_url))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "0.05"
    assert response.json()["error_code"] == 429001
    assert client.get("/v1/requests/any/status").status_code == 429
    counters = emulator.state.counters
    assert counters.jobs_created == 0 and counters.submits_total == 1
    assert counters.rejected_429 == 2


def test_fault_5xx_creates_no_job(emulator: EmulatorServer, client: httpx.Client) -> None:
    emulator.state.faults.update(fault_5xx=1.0)
    response = client.post(MODEL_PATH, json=body(emulator.base_url))
    assert response.status_code == 503
    assert response.json()["error_code"] == 500001
    answers = [client.get("/v1/requests/any/status") for _ in range(20)]
    codes = {answer.status_code for answer in answers}
    assert codes <= {500, 502, 503} and len(codes) > 1
    assert {answer.json()["error_code"] for answer in answers} == {500001}
    assert emulator.state.counters.jobs_created == 0


def test_fail_rate_one_fails_every_job(emulator: EmulatorServer, client: httpx.Client) -> None:
    emulator.state.faults.update(fail_rate=1.0)
    result = wait_done(
        client, client.post(MODEL_PATH, json=body(emulator.base_url)).json()["request_id"]
    )
    assert result["status"] == "failed"
    assert result["error"] == "Model run failed"
    assert emulator.state.counters.failed_jobs == 1


def test_dropped_submit_is_a_transport_error_but_the_job_exists(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    emulator.state.faults.update(drop_submits=1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post(MODEL_PATH, json=body(emulator.base_url))
    counters = emulator.state.counters
    assert counters.jobs_created == 1 and counters.dropped_submits == 1
    assert client.post(MODEL_PATH, json=body(emulator.base_url)).status_code == 202
    assert counters.jobs_created == 2 and counters.duplicate_bodies == 1


def test_a_held_submit_answers_only_after_its_job_exists(emulator: EmulatorServer) -> None:
    """The unknown-outcome fault: the job is created, then the answer is withheld. No
    client timeout races the emulator here; the test looks while the answer is held."""
    emulator.state.faults.update(hold_submits=True)
    counters = emulator.state.counters
    with (
        httpx.Client(base_url=emulator.base_url, timeout=60) as patient,
        ThreadPoolExecutor(1) as pool,
    ):
        answer = pool.submit(patient.post, MODEL_PATH, json=body(emulator.base_url))
        try:
            wait_until(lambda: counters.held_submits_now == 1)
            assert counters.jobs_created == 1 and not answer.done()
            job = list(emulator.state.jobs.values())[-1]
        finally:
            emulator.state.faults.update(hold_submits=False)
        response = answer.result(timeout=60)
    assert response.status_code == 202 and response.json()["request_id"] == job.request_id
    assert counters.held_submits_now == 0 and counters.jobs_created == 1


def test_submit_delay_withholds_the_answer_for_at_least_that_long(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    emulator.state.faults.update(submit_delay=0.3)
    started = time.monotonic()
    response = client.post(MODEL_PATH, json=body(emulator.base_url))
    assert time.monotonic() - started >= 0.3  # a lower bound only: load only adds to it
    assert response.status_code == 202
    assert emulator.state.counters.jobs_created == 1


def test_admin_endpoints(emulator: EmulatorServer, client: httpx.Client) -> None:
    client.post(MODEL_PATH, json=body(emulator.base_url))
    client.post(MODEL_PATH, json=body(emulator.base_url))
    stats = client.get("/_emulator/stats").json()
    assert stats["submits_total"] == 2 and stats["jobs_created"] == 2
    assert stats["duplicate_bodies"] == 1 and list(stats["body_submissions"].values()) == [2]

    changed = client.post("/_emulator/faults", json={"fault_429": 1, "retry_after": 0.05})
    assert changed.status_code == 200 and changed.json()["retry_after"] == "0.05"
    assert client.get("/v1/requests/x/status").status_code == 429
    refused = client.post("/_emulator/faults", json={"fault_429": 2})
    assert refused.status_code == 422
    held = client.post("/_emulator/faults", json={"hold_jobs": True, "hold_submits": False})
    assert held.status_code == 200 and held.json()["hold_jobs"] is True
    assert emulator.state.faults.hold_jobs is True
    assert client.post("/_emulator/faults", json={"hold_jobs": "yes"}).status_code == 422
    client.post("/_emulator/faults", json={"hold_jobs": False})
    assert "held_submits_now" in client.get("/_emulator/stats").json()
    assert client.post("/_emulator/faults", json={"bogus": 1}).status_code == 422
    client.post("/_emulator/faults", json={"fault_429": 0})

    reset = client.post("/_emulator/reset").json()
    assert reset["submits_total"] == 0 and reset["body_submissions"] == {}


def test_seeded_faults_repeat() -> None:
    def draws(seed: int) -> list[bool]:
        faults = Faults(fault_429=0.5, seed=seed)
        return [faults.roll(faults.fault_429) for _ in range(32)]

    assert draws(3) == draws(3) != draws(4)
    with pytest.raises(ValueError, match="fail_rate"):
        Faults(fail_rate=1.5)


def test_server_lifecycle_frees_the_port() -> None:
    server = EmulatorServer(EmulatorConfig(port=0))
    with server:
        port = int(server.base_url.rsplit(":", 1)[1])
        assert httpx.get(f"{server.base_url}/_emulator/stats").status_code == 200
    with pytest.raises(RuntimeError):
        _ = server.base_url
    with EmulatorServer(EmulatorConfig(port=port)) as again:
        assert again.base_url.endswith(f":{port}")


@pytest.mark.parametrize("dialect", ["documented", "seed"])
def test_bodies_parse_with_the_client_models(
    emulator: EmulatorServer, client: httpx.Client, dialect: str
) -> None:
    emulator.state.faults.update(dialect=dialect)
    handle = parse_submit(client.post(MODEL_PATH, json=body(emulator.base_url)).json())
    wait_done(client, handle.request_id)
    status = parse_status(client.get(f"/v1/requests/{handle.request_id}/status").json())
    assert status.state is JobState.COMPLETED and status.queue_position is None
    raw = client.get(f"/v1/requests/{handle.request_id}/result?include_cost=true").json()
    result = parse_result(raw)
    assert result.ok and result.cost_usd == pytest.approx(0.025)
    assert raw["cost" if dialect == "documented" else "cost_usd"] == pytest.approx(0.025)
    assert result.finished_at is not None and result.created_at is not None
    cancel = parse_cancel(client.post(f"/v1/requests/{handle.request_id}/cancel").json())
    assert not cancel.cancelled and cancel.state is JobState.COMPLETED


def test_fault_5xx_can_spare_submits(emulator: EmulatorServer, client: httpx.Client) -> None:
    emulator.state.faults.update(fault_5xx=1.0, fault_5xx_on_submit=False)
    submitted = client.post(MODEL_PATH, json=body(emulator.base_url))
    assert submitted.status_code == 202
    request_id = submitted.json()["request_id"]
    status = client.get(f"/v1/requests/{request_id}/status")
    assert status.status_code in (500, 502, 503)
    with pytest.raises(ValueError, match="fault_5xx_on_submit must be true or false"):
        emulator.state.faults.update(fault_5xx_on_submit="no")
