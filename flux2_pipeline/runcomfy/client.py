"""The async RunComfy client: submit, status, result, cancel, wait, run.

Example::

    async with AsyncRunComfyClient(token, base_url="http://127.0.0.1:8188") as client:
        result = await client.run(EditRequest(prompt="make it snow", image_urls=[url]))
        print(result.state, result.output_urls)

Every call goes through one path: the client builds the URL, its headers (made once
per call shape, GET or JSON POST) and the JSON bytes, and hands them to an
`HttpTransport` (see `runcomfy.transport`). The default is aiohttp's pool; pass
`transport=` any `httpx.AsyncBaseTransport` (`httpx.MockTransport` in tests,
`httpx.AsyncHTTPTransport(...)` for httpx's pool) or any `HttpTransport`.
The token lives only in the Authorization header the client hands the transport; it
is never part of a repr, a log line or an exception.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlsplit

import httpx

from flux2_pipeline.runcomfy.account import Balance, ModelPrice, parse_balance, parse_model_price
from flux2_pipeline.runcomfy.errors import (
    APIError,
    JobDeadlineExceeded,
    JobLostError,
    MalformedResponseError,
    NotFoundError,
    RateLimitError,
    ResultNotReadyError,
    RunComfyError,
    ServerError,
    SubmissionOutcomeUnknown,
    TransportError,
    UnknownJobStateError,
    error_for_response,
    submit_error_proves_no_job,
)
from flux2_pipeline.runcomfy.models import (
    MODEL_PATH,
    CancelOutcome,
    EditRequest,
    EditResult,
    JobHandle,
    JobState,
    JobStatus,
    parse_cancel,
    parse_result,
    parse_status,
    parse_submit,
)
from flux2_pipeline.runcomfy.polling import FinishForecast, PollSchedule
from flux2_pipeline.runcomfy.retry import RetryPolicy, is_retryable, parse_retry_after
from flux2_pipeline.runcomfy.security import is_loopback_host, require_secure_base_url
from flux2_pipeline.runcomfy.transport import (
    HttpTransport,
    HttpxTransport,
    RawResponse,
    default_transport,
)

DEFAULT_BASE_URL = "https://model-api.runcomfy.net"
DEFAULT_ACCOUNT_BASE_URL = "https://api.runcomfy.net"
"""Root of RunComfy's account API (one wallet for every product): the balance lives there."""
BALANCE_PATH = "/prod/v2/balance"
DEFAULT_JOB_DEADLINE = 30 * 60.0
"""Seconds a job may take from submit to a terminal state before it is cancelled."""
RESULT_LAG_GRACE = 30.0
"""Seconds `/result` may answer "not ready" (400005) after `/status` said the job failed or
was cancelled, before the status's own word is taken as the job's end."""
DEFAULT_LOST_JOB_GRACE = 60.0
"""Seconds an acknowledged job may answer 404 (on status and result) before `wait` gives it up."""
CANCEL_BUDGET = 10.0
"""Seconds a best-effort cancel may take while the caller is giving up on a job."""

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A poll that fails this way after the call's own retries is not a reason to give a paid
# job up: `wait` polls on, to the job's deadline.
_TRANSIENT_POLL_ERRORS = (ServerError, RateLimitError, TransportError, MalformedResponseError)

# Errors raised before any byte of the request left this process.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


@dataclass(slots=True)
class ClientStats:
    """Counters across the client's life, for benchmarks and logs."""

    submits: int = 0
    status_calls: int = 0
    result_calls: int = 0
    cancel_calls: int = 0
    retries: int = 0
    aimed_polls: int = 0
    """Status calls aimed at a job's forecast end (see `polling.FinishForecast`)."""
    aimed_hits: int = 0
    """Aimed status calls that found the job ended."""
    not_ready_results: int = 0
    """`/result` calls answered "not ready yet" (400005)."""
    transient_poll_errors: int = 0
    """Polls that failed after their retries and were followed by another poll."""


class AsyncRunComfyClient:
    """Async client for the RunComfy FLUX.2 [dev] edit queue API.

    Args:
        token: the API token; None only for an emulator started without one.
        base_url: API root; the model path is appended for submits.
        account_base_url: root of the account API (`balance`); default RunComfy's, or
            `base_url` itself when that is on loopback (the emulator serves both).
        timeout: per-HTTP-call timeout in seconds (or an `httpx.Timeout`).
        job_deadline: seconds from submit to a terminal state before `wait` cancels the job;
            a job that reports a state this client does not know is polled to it too.
        lost_job_grace: seconds a job may answer 404 on status and result before `wait`
            raises `JobLostError` (default `DEFAULT_LOST_JOB_GRACE`, 60).
        result_lag_grace: seconds `/result` may answer "not ready" after `/status` said the
            job failed or was cancelled (default `RESULT_LAG_GRACE`, 30).
        max_concurrency: jobs the caller keeps in flight; sizes the connection pool.
        retry: the retry policy for each HTTP call.
        poll: the adaptive poll schedule; default `PollSchedule.for_base_url(base_url)`
            (quick on loopback, about once a second and slower against a real host).
        transport: an `httpx.AsyncBaseTransport` (wrapped in `HttpxTransport`) or an
            `HttpTransport`; default: aiohttp's pool (`default_transport`), with the
            environment's proxy for `base_url`.
    """

    def __init__(
        self,
        token: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        *,
        account_base_url: str | None = None,
        model_path: str = MODEL_PATH,
        timeout: float | httpx.Timeout = 30.0,
        job_deadline: float = DEFAULT_JOB_DEADLINE,
        lost_job_grace: float = DEFAULT_LOST_JOB_GRACE,
        result_lag_grace: float = RESULT_LAG_GRACE,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = None,
        poll: PollSchedule | None = None,
        transport: httpx.AsyncBaseTransport | HttpTransport | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        account_base_url = account_base_url or default_account_base_url(base_url)
        require_secure_base_url(base_url, has_token=bool(token))
        require_secure_base_url(account_base_url, has_token=bool(token))
        self.base_url = base_url.rstrip("/")
        self.account_base_url = account_base_url.rstrip("/")
        self.model_path = "/" + model_path.strip("/")
        self.job_deadline = job_deadline
        self.lost_job_grace = lost_job_grace
        self.result_lag_grace = result_lag_grace
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryPolicy()
        self.poll = poll or PollSchedule.for_base_url(self.base_url)
        self.forecast = FinishForecast()
        """When new jobs are expected to end, learned from this client's completed jobs."""
        self.stats = ClientStats()
        headers = {"Accept": "application/json", "User-Agent": "flux2-pipeline"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # Kept only to scrub it from the service's words: some answers echo it.
        self._scrub = token
        # Built once: every call of a shape sends the same headers.
        self._headers = {False: headers, True: {**headers, "Content-Type": "application/json"}}
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if transport is None:
            # A job makes one call at a time, so `max_concurrency` connections would do;
            # the rest is room for cancels and a caller's extra calls.
            connections = max(16, max_concurrency * 2)
            self._transport: HttpTransport = default_transport(connections, self.base_url)
        elif isinstance(transport, httpx.AsyncBaseTransport):
            self._transport = HttpxTransport(transport)
        else:
            self._transport = transport

    def __repr__(self) -> str:
        return f"AsyncRunComfyClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._transport.aclose()

    # -- the four API calls ------------------------------------------------------------

    async def submit(self, request: EditRequest) -> JobHandle:
        """Queue one edit job (a paid call) and return its handle.

        Raises the ordinary errors only when the answer proves that no job exists:
        HTTP 400/401/402/403/404/422 (`BadRequestError`, `AuthenticationError`, ...),
        429 (`RateLimitError`, after the retries), or a `TransportError` with
        `sent=False` (connection refused, connect or pool timeout; retried first).
        Every other outcome raises `SubmissionOutcomeUnknown`: a 5xx or 408 (with or
        without an error body), any other status, a 2xx without a usable request id
        or whose body is not a JSON object, a dropped connection or a read timeout.
        The job may then exist; this method never resubmits on its own.
        (`errors.submit_error_proves_no_job` is the rule for statuses.)
        """
        self.stats.submits += 1
        return await self._call(
            "POST", self.model_path, parse_submit, json=request.payload(), submit=True
        )

    async def status(self, request_id: str) -> JobStatus:
        """The job's current state (and queue position while queued)."""
        self.stats.status_calls += 1
        path = _job_path(request_id, "status")
        parse = partial(parse_status, request_id=request_id)
        return await self._call("GET", path, parse, request_id=request_id)

    async def result(self, request_id: str) -> EditResult:
        """The job's result: state, image URLs, error, timestamps and cost."""
        self.stats.result_calls += 1
        path = _job_path(request_id, "result") + "?include_cost=true"
        parse = partial(parse_result, request_id=request_id)
        return await self._call("GET", path, parse, request_id=request_id)

    async def cancel(self, request_id: str) -> CancelOutcome:
        """Ask the API to cancel a job; only queued jobs can be cancelled."""
        self.stats.cancel_calls += 1
        path = _job_path(request_id, "cancel")
        parse = partial(parse_cancel, request_id=request_id)
        return await self._call("POST", path, parse, request_id=request_id)

    # -- the model's price and the account's balance ----------------------------------

    async def model_price(self) -> ModelPrice:
        """The model's published price (`GET` on the model's own path: `base_price_usd`).

        Raises `MalformedResponseError` when the answer carries no usable price.
        """
        return await self._call("GET", self.model_path, parse_model_price)

    async def balance(self) -> Balance:
        """The account's balance (`GET {account_base_url}/prod/v2/balance`); may be 0 or less."""
        return await self._call("GET", BALANCE_PATH, parse_balance, base=self.account_base_url)

    # -- whole jobs --------------------------------------------------------------------

    async def wait(
        self,
        request_id: str,
        *,
        deadline: float | None = None,
        submitted_at: datetime | None = None,
    ) -> EditResult:
        """Poll a job to a terminal state and return its result.

        Status calls follow `poll`, with one aimed just after the job's forecast end
        (`forecast`, counted from `submitted_at`, else from now).
        On deadline (default `job_deadline`) or when the caller cancels this
        coroutine, a cancel is sent for the job before the error propagates.
        A 404 for the job (on status or result) is not taken at its word: polling
        goes on, asking `/result` too, and only when both keep answering 404 for
        `lost_job_grace` seconds does this raise `JobLostError`.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget = self.job_deadline if deadline is None else deadline
        calls = 0
        unknown_state: str | None = None
        missing_since: float | None = None
        not_ready_since: float | None = None
        # The forecast end, in seconds after `started`; None once its call was made.
        aim = self.forecast.seconds()
        if aim is not None and submitted_at is not None:
            aim -= max(0.0, (datetime.now(UTC) - submitted_at).total_seconds())
        try:
            while True:
                elapsed = loop.time() - started
                remaining = budget - elapsed
                if remaining <= 0:
                    await self._cancel_quietly(request_id)
                    raise JobDeadlineExceeded(
                        _deadline_message(budget, unknown_state), request_id=request_id
                    )
                delay = self.poll.interval(elapsed)
                aimed = aim is not None and aim - elapsed < delay
                if aimed:
                    assert aim is not None
                    delay, aim = max(0.0, aim - elapsed), None
                    self.stats.aimed_polls += 1
                await asyncio.sleep(min(delay, remaining))
                calls += 1
                try:
                    status = await self.status(request_id)
                except UnknownJobStateError as unknown:
                    # Never a reason to give a paid job up: poll on, to the deadline.
                    unknown_state = unknown.state
                    continue
                except NotFoundError:
                    status = None  # perhaps a transient 404: /result decides below
                except _TRANSIENT_POLL_ERRORS as error:
                    self._note_transient(request_id, error)
                    continue
                unknown_state = None
                if status is not None and not status.state.is_terminal:
                    missing_since = not_ready_since = None
                    continue
                try:
                    result = await self.result(request_id)
                except NotFoundError as missing:
                    now = loop.time()
                    missing_since = missing_since if missing_since is not None else now
                    if now - missing_since >= self.lost_job_grace:
                        raise _job_lost(request_id, now - missing_since, missing) from missing
                    continue
                except ResultNotReadyError:
                    self.stats.not_ready_results += 1
                    now = loop.time()
                    not_ready_since = not_ready_since if not_ready_since is not None else now
                    lagging = now - not_ready_since
                    if _status_may_end_it(status) and lagging >= self.result_lag_grace:
                        assert status is not None
                        return _result_from_status(status, calls, submitted_at)
                    continue
                except UnknownJobStateError as unknown:
                    unknown_state = unknown.state
                    continue
                except _TRANSIENT_POLL_ERRORS as error:
                    self._note_transient(request_id, error)
                    continue
                missing_since = not_ready_since = None
                if result.state.is_terminal:
                    if aimed and status is not None:
                        self.stats.aimed_hits += 1
                    if result.state is JobState.COMPLETED:
                        self.forecast.observe(result.created_at, result.finished_at)
                    if result.error is None and status is not None and status.error:
                        result = replace(result, error=status.error)
                    return replace(result, status_calls=calls, submitted_at=submitted_at)
        except asyncio.CancelledError:
            await self._cancel_quietly(request_id)
            raise

    async def run(self, request: EditRequest, *, deadline: float | None = None) -> EditResult:
        """Submit one job and wait for its result."""
        handle = await self.submit(request)
        return await self.wait(handle.request_id, deadline=deadline, submitted_at=datetime.now(UTC))

    # -- plumbing ----------------------------------------------------------------------

    def _scrubbed(self, body: Any) -> Any:
        """The answer with the token cut out of its words (a service may echo it back)."""
        if not self._scrub:
            return body
        text = jsonlib.dumps(body) if not isinstance(body, str) else body
        if self._scrub not in text:
            return body
        cleaned = text.replace(self._scrub, "[token]")
        return cleaned if isinstance(body, str) else jsonlib.loads(cleaned)

    def _note_transient(self, request_id: str, error: RunComfyError) -> None:
        self.stats.transient_poll_errors += 1
        logger.info("poll of %s failed (%s); polling on", request_id, error)

    async def _cancel_quietly(self, request_id: str) -> None:
        try:
            async with asyncio.timeout(CANCEL_BUDGET):
                outcome = await self.cancel(request_id)
            logger.info("cancel %s: cancelled=%s", request_id, outcome.cancelled)
        except (RunComfyError, TimeoutError) as exc:
            logger.warning("cancel %s failed: %s", request_id, exc)

    async def _call(
        self,
        method: str,
        path: str,
        parse: Callable[[dict[str, Any]], T],
        *,
        json: Any = None,
        submit: bool = False,
        request_id: str | None = None,
        base: str | None = None,
    ) -> T:
        """One API call with retries; `path` is escaped already (and may carry a query)."""
        url = (base or self.base_url) + path
        content = None if json is None else _json_bytes(json)
        headers = self._headers[content is not None]
        attempts = 0
        while True:
            attempts += 1
            try:
                code, body = await self._call_once(
                    method, path, url, headers, content, submit, request_id
                )
                return _parsed(parse, body, f"{method} {path}: HTTP {code}", submit, code)
            except RunComfyError as error:
                retry_after = error.retry_after if isinstance(error, APIError) else None
                if not is_retryable(error, submit=submit) or not self.retry.allows_another(
                    attempts
                ):
                    raise
                self.stats.retries += 1
                wait = self.retry.delay(attempts - 1, retry_after)
                logger.debug("retrying %s %s in %.2fs after: %s", method, path, wait, error)
                await asyncio.sleep(wait)

    async def _call_once(
        self,
        method: str,
        path: str,
        url: str,
        headers: dict[str, str],
        content: bytes | None,
        submit: bool,
        request_id: str | None,
    ) -> tuple[int, dict[str, Any]]:
        """One exchange: the status and JSON object of a success, or the error it means."""
        try:
            answer = await self._transport.send(method, url, headers, content, self._timeout)
        except _NOT_SENT as exc:
            raise TransportError(
                f"{method} {path}: could not connect ({type(exc).__name__})",
                request_id=request_id,
                sent=False,
            ) from exc
        except httpx.TransportError as exc:
            what = f"{method} {path}: no answer ({type(exc).__name__})"
            if submit:
                raise SubmissionOutcomeUnknown(
                    what + "; the API may have created a job", request_id=request_id
                ) from exc
            raise TransportError(what, request_id=request_id) from exc
        code = answer.status_code
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s -> HTTP %d", method, path, code)
        body = _decode(answer)
        # RunComfy sends some errors with HTTP 200: a body with an error code is an error.
        if 200 <= code < 300 and not (
            isinstance(body, dict) and body.get("error_code") is not None
        ):
            if isinstance(body, dict):
                return code, body
            what = f"{method} {path}: expected a JSON object, got HTTP {code}"
            if submit:
                raise SubmissionOutcomeUnknown(
                    what + "; the API may have created a job", status_code=code
                )
            raise MalformedResponseError(what, request_id=request_id)
        error = error_for_response(
            code,
            self._scrubbed(body),
            request_id=request_id,
            retry_after=parse_retry_after(answer.headers.get("Retry-After")),
        )
        if submit and not submit_error_proves_no_job(code, error.error_code):
            raise SubmissionOutcomeUnknown(
                f"{method} {path}: {error}; the API may have created a job",
                request_id=request_id,
                status_code=code,
            ) from error
        raise error


def default_account_base_url(base_url: str) -> str:
    """RunComfy's account API, or the API root itself when that is on loopback: an emulator
    serves the balance too, and a local setup must never reach out to the real account.

    >>> default_account_base_url("http://127.0.0.1:8188")
    'http://127.0.0.1:8188'
    >>> default_account_base_url("https://model-api.runcomfy.net")
    'https://api.runcomfy.net'
    """
    host = urlsplit(base_url).hostname or ""
    return base_url.rstrip("/") if is_loopback_host(host) else DEFAULT_ACCOUNT_BASE_URL


def _job_path(request_id: str, action: str) -> str:
    # Ids come from the API or a ledger; escaping keeps a strange one inside its own path.
    return f"/v1/requests/{quote(request_id, safe='')}/{action}"


def _job_lost(request_id: str, seconds: float, last: NotFoundError) -> JobLostError:
    return JobLostError(
        f"the API no longer knows this job after {seconds:.1f} s of 404 on status and result",
        status_code=404,
        error_code=last.error_code,
        request_id=request_id,
    )


def _deadline_message(budget: float, unknown_state: str | None) -> str:
    message = f"job did not finish within {budget:g} s; cancel requested"
    if unknown_state is not None:
        message += f"; it last reported the state {unknown_state[:40]!r}, unknown to this client"
    return message


def _status_may_end_it(status: JobStatus | None) -> bool:
    # Only a failed or cancelled job can end without its /result: a completed one needs it.
    return status is not None and status.state in (JobState.FAILED, JobState.CANCELLED)


def _result_from_status(status: JobStatus, calls: int, submitted_at: datetime | None) -> EditResult:
    return EditResult(
        request_id=status.request_id,
        state=status.state,
        error=status.error or f"the job ended {status.state.value}",
        status_calls=calls,
        submitted_at=submitted_at,
    )


def _parsed(
    parse: Callable[[dict[str, Any]], T], body: dict[str, Any], what: str, submit: bool, code: int
) -> T:
    try:
        return parse(body)
    except MalformedResponseError as exc:
        if not submit:
            raise
        # A 2xx without a usable request id: the job may exist all the same.
        raise SubmissionOutcomeUnknown(
            f"{what}, but {exc.message}; the API may have created a job", status_code=code
        ) from exc


def _json_bytes(payload: Any) -> bytes:
    text = jsonlib.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode()


def _decode(answer: RawResponse) -> Any:
    """The answer's JSON, or its text when it is not JSON (error messages quote it)."""
    try:
        return jsonlib.loads(answer.content)
    except ValueError:
        return answer.content.decode("utf-8", errors="replace")
