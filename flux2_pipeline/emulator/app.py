"""The RunComfy-compatible Starlette app: routes, the job queue, faults and counters.

`create_app(config)` builds the ASGI app; its `EmulatorState` (queue, `Faults`,
`Counters`) is reachable as `app.state.emulator`::

    >>> app = create_app(EmulatorConfig(latency=0.5, max_concurrent=2))
    >>> app.state.emulator.faults.update(fault_429=0.1)

Routes (`{id}` is a job's request id)

- `POST /v1/models/blackforestlabs/flux-2/dev/edit`: submit a job (202 `{request_id,
  status: "in_queue", status_url, result_url, cancel_url}`; 200 without `status` in the
  seed dialect)
- `GET /v1/models/blackforestlabs/flux-2/dev/edit`: the model, its price per image and
  its input schema (`model_route` can make it answer 404 or 500)
- `GET /v1/requests/{id}/status`, `GET /v1/requests/{id}/result[?include_cost=true]`,
  `POST /v1/requests/{id}/cancel`
- `GET /prod/v2/balance`: the account's balance (RunComfy serves it from another host;
  point `RUNCOMFY_ACCOUNT_BASE_URL` here)
- `GET /v1/outputs/{id}/{index}.{ext}`: an output image, rendered on first fetch (no auth)
- `GET /samples/{name}.png`: a deterministic 512x512 reference picture (no auth)
- `GET /_emulator/stats`, `POST /_emulator/faults`, `POST /_emulator/reset`: control
  routes; they need the token too when the emulator has one

Any other model id under `/v1/models/` answers 400 with error 400001. Errors are
`{error_code, error_message[, detail]}`, with RunComfy's numeric codes in the documented
dialect (see `dialect.ERROR_CODES`). The emulator never redirects.

Limits: a body over `max_body_bytes` answers 413; a submit while `max_queue` jobs wait
answers 429 `QUEUE_FULL` with Retry-After and creates no job. A submit whose price the
balance (less what queued and running jobs reserve) cannot cover answers 400002 with
HTTP 400 (HTTP 200 with `balance_error_http_200`) and creates no job.

In the documented dialect, `/result` of a job that has not ended (or ended less than
`result_lag` seconds ago) answers 400 with error 400005.

Faults apply to the four authenticated job routes only, after the token check:
`fault_429` answers 429 with `Retry-After`; `fault_5xx` answers 503 for submit and
cancel, and 500, 502 or 503 (drawn at random) for status and result
(`fault_5xx_on_submit=False` spares submits); `fault_200_error` answers a status or
result poll with HTTP 200 and a 500001 error body. A rejected submit never creates a job.
`submit_delay` (seconds) and `hold_submits` (until cleared) withhold a submit's answer
after its job exists; `hold_jobs` keeps running jobs from finishing until cleared.
`expire_outputs` (request ids) makes those jobs' output URLs answer 410; with
`refresh_outputs`, their `/result` gives fresh URLs that work.
Every `*_calls` / `submits_total` counter counts requests
received, rejected ones included; `body_submissions` counts jobs created per body;
`image_fetches` counts HTTP requests for output and sample images.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from pydantic import Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from flux2_pipeline.emulator.dialect import error_body, job_error, state_word
from flux2_pipeline.emulator.render import CONTENT_TYPES
from flux2_pipeline.emulator.state import (
    MICRO,
    UNLIMITED_BALANCE_USD,
    EmulatorConfig,
    EmulatorState,
    Job,
)
from flux2_pipeline.runcomfy.models import MAX_IMAGE_URLS, MODEL_PATH, PARAMETER_NAMES, EditRequest
from flux2_pipeline.runcomfy.models import JobState as State

__all__ = ["create_app"]

MODEL_ID = MODEL_PATH.removeprefix("/v1/models/")
BALANCE_PATH = "/prod/v2/balance"
_ALLOWED_FIELDS = frozenset({"prompt", "image_urls", *PARAMETER_NAMES})
_OUTPUT_NAME = re.compile(r"(\d{1,2})\.(png|jpeg|jpg|webp)")
_SAMPLE_NAME = re.compile(r"([a-z0-9_-]{1,64})\.png")
_5XX_CODES = {500: "INTERNAL_ERROR", 502: "BAD_GATEWAY", 503: "SERVICE_UNAVAILABLE"}


class _ApiEditRequest(EditRequest):
    # The API refuses a fourth URL; the client-side model cuts it instead.
    image_urls: tuple[str, ...] = Field(min_length=1, max_length=MAX_IMAGE_URLS)


def _input_schema() -> dict[str, Any]:
    schema = _ApiEditRequest.model_json_schema()
    schema["properties"] = {
        name: spec for name, spec in schema["properties"].items() if name in _ALLOWED_FIELDS
    }
    schema["title"] = "FLUX.2 [dev] edit"
    return schema


class _ConnectionDropped(Exception):
    """Raised after a partial response so the server closes the connection."""


class _DroppedResponse(Response):
    # Sends the status line, headers and half the body, then aborts: the client
    # sees an incomplete response, as when a proxy drops a connection.
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send(
            {
                "type": "http.response.body",
                "body": self.body[: len(self.body) // 2],
                "more_body": True,
            }
        )
        raise _ConnectionDropped("emulated connection drop")


class _HideDroppedConnections(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _ConnectionDropped))


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideDroppedConnections) for f in logger.filters):
        logger.addFilter(_HideDroppedConnections())


def create_app(config: EmulatorConfig | None = None) -> Starlette:
    """Build the emulator's ASGI app; its state is `app.state.emulator`.

    Example::

        >>> app = create_app(EmulatorConfig(token="secret"))
        >>> uvicorn.run(app, port=8188)  # or use EmulatorServer
    """
    state = EmulatorState(config or EmulatorConfig())
    _install_log_filter()

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await state.aclose()

    def api(
        counter: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            state.counters.bump(counter)
            denied = _gate(state, request, submit=counter == "submits_total")
            return denied if denied is not None else await handler(request)

        return endpoint

    def account(
        counter: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        # The model and balance routes: the token is checked, no fault is drawn.
        async def endpoint(request: Request) -> Response:
            state.counters.bump(counter)
            if _unauthorized(state, request):
                state.counters.bump("rejected_401")
                return _unauthorized_response(state)
            return await handler(request)

        return endpoint

    def control(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if _unauthorized(state, request):
                state.counters.bump("rejected_control_401")
                return _unauthorized_response(state)
            return await handler(request)

        return endpoint

    async def submit(request: Request) -> Response:
        raw = await _read_body(state, request)
        if isinstance(raw, Response):
            return raw
        if state.queue_full:
            state.counters.bump("rejected_queue_full")
            return _error(
                state,
                "QUEUE_FULL",
                f"the queue holds {state.config.max_queue} jobs (emulated limit); "
                f"retry after {state.faults.retry_after} s",
                429,
                headers={"Retry-After": state.faults.retry_after},
            )
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return _invalid(state, [([], "body is not valid JSON", "json_invalid")])
        if not isinstance(body, dict):
            return _invalid(state, [([], "body must be a JSON object", "dict_type")])
        parsed = _validate(body)
        if not isinstance(parsed, EditRequest):
            return _invalid(state, parsed)
        cost = round(state.faults.price_usd * MICRO) * parsed.num_images
        if not state.can_afford(cost):
            return _insufficient(state)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        state.note_host(request.url.netloc)
        job = state.submit(parsed, hashlib.sha256(canonical.encode()).hexdigest(), cost)
        base = _base_url(request)
        payload: dict[str, Any] = {"request_id": job.request_id}
        if state.faults.documented:
            payload["status"] = "in_queue"
        payload.update(
            status_url=f"{base}/v1/requests/{job.request_id}/status",
            result_url=f"{base}/v1/requests/{job.request_id}/result",
            cancel_url=f"{base}/v1/requests/{job.request_id}/cancel",
        )
        if state.faults.submit_delay > 0:
            await asyncio.sleep(state.faults.submit_delay)
        await state.hold_answer()
        if state.faults.take_drop():
            state.counters.bump("dropped_submits")
            return _DroppedResponse(
                json.dumps(payload).encode(),
                status_code=202 if state.faults.documented else 200,
                media_type="application/json",
            )
        return JSONResponse(payload, status_code=202 if state.faults.documented else 200)

    async def status(request: Request) -> Response:
        job = state.jobs.get(request.path_params["request_id"])
        if job is None:
            return _not_found(state, request)
        body: dict[str, Any] = {"request_id": job.request_id, "status": _status_word(state, job)}
        position = state.queue_position(job)
        if position is not None:
            body["queue_position"] = position
        if job.state is State.FAILED and state.faults.documented:
            body["error"] = _job_error(state, job)
        return JSONResponse(body)

    async def result(request: Request) -> Response:
        job = state.jobs.get(request.path_params["request_id"])
        if job is None:
            return _not_found(state, request)
        faults = state.faults
        if faults.documented and not _result_ready(state, job):
            state.counters.bump("results_not_ready")
            return _error(
                state,
                "RESULT_NOT_READY",
                f"the result of request {job.request_id} is not ready yet",
                400,
            )
        completed = job.state is State.COMPLETED
        word = "succeeded" if completed and faults.documented else _status_word(state, job)
        body: dict[str, Any] = {
            "request_id": job.request_id,
            "status": word,
            "output": {"images": _output_urls(request, job)} if completed else None,
            "error": _job_error(state, job) if job.state is State.FAILED else None,
            "created_at": _iso(job.created_at),
            "finished_at": _iso(job.finished_at),
        }
        if completed and request.query_params.get("include_cost", "").lower() in ("true", "1"):
            body["cost" if faults.documented else "cost_usd"] = round(job.cost_micro / MICRO, 6)
        return JSONResponse(body)

    async def cancel(request: Request) -> Response:
        job = state.jobs.get(request.path_params["request_id"])
        if job is None:
            return _not_found(state, request)
        outcome = "cancelled" if state.cancel(job) else "not_cancellable"
        return JSONResponse(
            {"request_id": job.request_id, "status": _status_word(state, job), "outcome": outcome}
        )

    async def model(_request: Request) -> Response:
        route = state.faults.model_route
        if route == "missing":
            return _error(state, "NOT_FOUND", f"no such model {MODEL_ID!r}", 404)
        if route == "error":
            return _error(state, "INTERNAL_ERROR", "the model service failed (emulated)", 500)
        return JSONResponse(
            {
                "model_id": MODEL_ID,
                "display_name": "FLUX.2 [dev] Edit",
                "categories": ["image-to-image"],
                "base_price_usd": state.faults.price_usd,
                "price_unit": "image",
                "input_schema": input_schema,
            }
        )

    async def other_model(request: Request) -> Response:
        state.counters.bump("rejected_400001")
        model_id = request.path_params["model_id"]
        return _error(state, "BAD_MODEL_ID", f"unknown model id {model_id[:100]!r}", 400)

    async def balance(_request: Request) -> Response:
        route = state.faults.balance_route
        if route == "missing":
            return _error(state, "NOT_FOUND", f"no such resource {BALANCE_PATH}", 404)
        if route == "error":
            return _error(state, "INTERNAL_ERROR", "the account service failed (emulated)", 500)
        if route == "denied":
            return _error(state, "ACCOUNT_DENIED", "access to the account is denied", 200)
        micro = state.balance_micro
        if micro is None:
            micro = round(UNLIMITED_BALANCE_USD * MICRO)
        return JSONResponse(
            {"balance_usd": micro / MICRO, "balance_microdollars": micro, "currency": "USD"}
        )

    async def http_error(_request: Request, exc: Exception) -> Response:
        # Unknown paths and wrong methods answer in the API's JSON error shape too.
        assert isinstance(exc, HTTPException)
        name = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
        return _error(state, name, str(exc.detail), exc.status_code, headers=exc.headers)

    async def output(request: Request) -> Response:
        state.counters.bump("image_fetches")
        job = state.jobs.get(request.path_params["request_id"])
        match = _OUTPUT_NAME.fullmatch(request.path_params["name"])
        if job is None or match is None or job.state is not State.COMPLETED:
            return _not_found(state, request)
        index, ext = int(match.group(1)), match.group(2).replace("jpg", "jpeg")
        if index >= job.request.num_images or ext != job.request.output_format:
            return _not_found(state, request)
        if _expired_output(state, request):
            return _gone(request)
        data = await state.output_image(job, index)
        return Response(data, media_type=CONTENT_TYPES[ext], headers=_IMMUTABLE)

    async def sample(request: Request) -> Response:
        state.counters.bump("image_fetches")
        match = _SAMPLE_NAME.fullmatch(request.path_params["name"])
        if match is None:
            return _not_found(state, request)
        data = await state.sample(match.group(1))
        return Response(data, media_type="image/png", headers=_IMMUTABLE)

    async def stats(_request: Request) -> Response:
        return JSONResponse(state.stats())

    async def faults(request: Request) -> Response:
        raw = await _read_body(state, request)
        if isinstance(raw, Response):
            return raw
        try:
            changes = json.loads(raw or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object")
            state.update_settings(changes)
        except (ValueError, TypeError) as exc:
            return _error(state, "VALIDATION_ERROR", str(exc), 422)
        return JSONResponse(state.settings())

    async def reset(_request: Request) -> Response:
        state.reset_counters()
        return JSONResponse(state.stats())

    input_schema = _input_schema()
    routes = [
        Route(MODEL_PATH, api("submits_total", submit), methods=["POST"]),
        Route(MODEL_PATH, account("model_calls", model), methods=["GET"]),
        Route("/v1/requests/{request_id}/status", api("status_calls", status), methods=["GET"]),
        Route("/v1/requests/{request_id}/result", api("result_calls", result), methods=["GET"]),
        Route("/v1/requests/{request_id}/cancel", api("cancel_calls", cancel), methods=["POST"]),
        Route(
            "/v1/models/{model_id:path}",
            account("model_calls", other_model),
            methods=["GET", "POST"],
        ),
        Route(BALANCE_PATH, account("balance_calls", balance), methods=["GET"]),
        Route("/v1/outputs/{request_id}/{name}", output, methods=["GET"]),
        Route("/samples/{name}", sample, methods=["GET"]),
        Route("/_emulator/stats", control(stats), methods=["GET"]),
        Route("/_emulator/faults", control(faults), methods=["POST"]),
        Route("/_emulator/reset", control(reset), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )
    app.router.redirect_slashes = False  # RunComfy's clients never follow redirects
    app.state.emulator = state
    return app


_IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}


def _unauthorized(state: EmulatorState, request: Request) -> bool:
    """True when the emulator has a token and the request does not carry it."""
    token = state.config.token
    if token is None:
        return False
    presented = request.headers.get("authorization", "")
    scheme, _, value = presented.partition(" ")
    return scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode(), token.encode()
    )


def _error(
    state: EmulatorState,
    name: str,
    message: str,
    status: int,
    *,
    detail: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error answer, its code spelled in the emulator's dialect."""
    code_status = status if status >= 400 else 500
    body = error_body(state.faults.dialect, name, message, status=code_status, detail=detail)
    return JSONResponse(body, status_code=status, headers=headers)


def _status_word(state: EmulatorState, job: Job) -> str:
    faults = state.faults
    word = state_word(faults.dialect, job.state, succeeded=job.says_succeeded)
    if faults.documented and faults.extra_states and faults.roll(0.5):
        if job.state is State.IN_QUEUE:
            return ("pending", "waiting")[faults.choice((0, 1))]
        if job.state is State.IN_PROGRESS:
            return ("starting", "processing")[faults.choice((0, 1))]
    return word


def _job_error(state: EmulatorState, job: Job) -> Any:
    seed = job.error or {"error_code": "INTERNAL_ERROR", "error_message": "unknown failure"}
    message = job.failure or seed["error_message"]
    return job_error(state.faults.dialect, state.faults.error_shape, seed, message)


def _result_ready(state: EmulatorState, job: Job) -> bool:
    if not job.state.is_terminal or job.finished_at is None:
        return False
    lag = state.faults.result_lag
    return lag <= 0 or (datetime.now(UTC) - job.finished_at).total_seconds() >= lag


def _insufficient(state: EmulatorState) -> JSONResponse:
    state.counters.bump("rejected_400002")
    status = 200 if state.faults.balance_error_http_200 else 400
    return _error(state, "INSUFFICIENT_RESOURCES", "Insufficient resources", status)


def _unauthorized_response(state: EmulatorState) -> JSONResponse:
    return _error(
        state,
        "UNAUTHORIZED",
        "missing or invalid API token",
        401,
        headers={"WWW-Authenticate": "Bearer"},
    )


async def _read_body(state: EmulatorState, request: Request) -> bytes | Response:
    """The request body, or a 413 answer once it passes `max_body_bytes` (never all read)."""
    limit = state.config.max_body_bytes
    declared = request.headers.get("content-length", "")
    size = 0
    chunks: list[bytes] = []
    if not (declared.isdigit() and int(declared) > limit):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
        else:
            return b"".join(chunks)
    state.counters.bump("rejected_413")
    return _error(state, "PAYLOAD_TOO_LARGE", f"request body is larger than {limit} bytes", 413)


def _gate(state: EmulatorState, request: Request, *, submit: bool) -> Response | None:
    if _unauthorized(state, request):
        state.counters.bump("rejected_401")
        return _unauthorized_response(state)
    faults = state.faults
    if faults.roll(faults.fault_429):
        state.counters.bump("rejected_429")
        return _error(
            state,
            "RATE_LIMITED",
            f"too many requests (emulated); retry after {faults.retry_after} s",
            429,
            headers={"Retry-After": faults.retry_after},
        )
    if (faults.fault_5xx_on_submit or not submit) and faults.roll(faults.fault_5xx):
        state.counters.bump("rejected_5xx")
        code = 503 if submit or request.method == "POST" else faults.choice((500, 502, 503))
        return _error(state, _5XX_CODES[code], "the service failed (emulated)", code)
    if request.method == "GET" and faults.roll(faults.fault_200_error):
        state.counters.bump("errors_200")
        return _error(state, "INTERNAL_ERROR", "internal error (emulated)", 200)
    return None


Issue = tuple[list[str | int], str, str]


def _validate(body: Mapping[str, Any]) -> EditRequest | list[Issue]:
    issues: list[Issue] = [
        ([name], "is not a parameter of this model", "extra_forbidden")
        for name in body
        if name not in _ALLOWED_FIELDS
    ]
    known = {name: value for name, value in body.items() if name in _ALLOWED_FIELDS}
    try:
        parsed = _ApiEditRequest.model_validate(known)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["type"] == "too_long" and error["loc"] == ("image_urls",):
                given = len(body["image_urls"])
                message = f"at most {MAX_IMAGE_URLS} image URLs are allowed, got {given}"
            issues.append((list(error["loc"]), message, str(error["type"])))
        return issues
    return issues if issues else parsed


def _invalid(state: EmulatorState, issues: list[Issue]) -> JSONResponse:
    state.counters.bump("rejected_422")
    detail = [{"loc": ["body", *loc], "msg": msg, "type": kind} for loc, msg, kind in issues]
    summary = "; ".join(
        f"{'.'.join(str(part) for part in loc) or 'body'}: {msg}" for loc, msg, _ in issues
    )
    return _error(state, "VALIDATION_ERROR", summary, 422, detail=detail)


def _not_found(state: EmulatorState, request: Request) -> JSONResponse:
    rid = request.path_params.get("request_id")
    message = f"no job with request_id {rid!r}" if rid else f"no such resource {request.url.path}"
    return _error(state, "NOT_FOUND", message, 404)


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _output_urls(request: Request, job: Job) -> list[str]:
    base = f"{_base_url(request)}/v1/outputs/{job.request_id}"
    ext = job.request.output_format
    faults = request.app.state.emulator.faults
    fresh = "?fresh=1" if faults.refresh_outputs and job.request_id in faults.expire_outputs else ""
    return [f"{base}/{index}.{ext}{fresh}" for index in range(job.request.num_images)]


def _expired_output(state: EmulatorState, request: Request) -> bool:
    """An output of a job in `expire_outputs`, not asked through a refreshed URL."""
    expired = request.path_params["request_id"] in state.faults.expire_outputs
    return expired and request.query_params.get("fresh") != "1"


def _gone(request: Request) -> JSONResponse:
    rid = request.path_params["request_id"]
    message = f"the outputs of request_id {rid!r} have expired (emulated)"
    return JSONResponse({"error_code": "OUTPUT_EXPIRED", "error_message": message}, status_code=410)


def _iso(moment: Any) -> str | None:
    if moment is None:
        return None
    return str(moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
