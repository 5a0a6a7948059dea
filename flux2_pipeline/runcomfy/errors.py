"""One exception tree for everything the RunComfy client can raise.

    RunComfyError
    ├── InvalidEditRequest          the request breaks the schema; never sent (lists FieldIssues)
    ├── MalformedResponseError      the API answered something we cannot read
    ├── UnknownJobStateError        the API reported a job state this client does not know
    ├── JobDeadlineExceeded         polling gave up; the client asked the API to cancel the job
    ├── TransportError              no usable HTTP answer (refused, timed out, dropped)
    │   └── SubmissionOutcomeUnknown  a submit's answer does not prove that no job exists
    └── APIError                    the API answered with an error (status, error code, request id)
        ├── BadRequestError         400 / code family 400
        ├── ResultNotReadyError     400005 on /result: the job's result is not there yet
        ├── AccountRefusedError     the account, not the row, is refused: stop submitting
        │   ├── AuthenticationError 401 / 403, 400004, 401xxx, 403001, 403003
        │   └── InsufficientCreditError 402, 400002: the balance cannot pay for the job
        ├── NotFoundError           404 / 404001: unknown request id or route
        │   └── JobLostError        404 on status and result for longer than the grace
        ├── RequestRejectedError    422 / 422001: the API's own schema validation (see `detail`)
        ├── RateLimitError          429 / family 429 (may carry `retry_after`)
        └── ServerError             408 and 5xx / family 500 (often as HTTP 200 with 500001)

RunComfy's numeric codes (`flux2_pipeline.runcomfy.codes`) decide before the HTTP status:
an answer whose body holds an `error_code` is an error whatever its status, and its
class follows the code's family (`APIError.family`).

Every `APIError` carries `status_code`, `error_code`, `message` and `request_id`;
none of them ever contains the API token (the client never puts it anywhere but the
Authorization header). `error_for_response` is the one place an HTTP answer
becomes an exception.

A submit is a paid call, so what its answer proves decides whether money may have been
spent: `submit_error_proves_no_job` states the rule (docs/ledger.md, "Unknown outcomes").
An answer that proves no job exists raises the ordinary error (`TransportError(sent=False)`
when nothing left); any other raises `SubmissionOutcomeUnknown`, never retried.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flux2_pipeline.runcomfy.codes import (
    ACCOUNT_HTTP_STATUSES,
    INSUFFICIENT_BALANCE,
    NO_JOB_FAMILIES,
    RESULT_NOT_READY,
    code_family,
    describe_code,
    is_account_code,
    numeric_code,
)


class RunComfyError(Exception):
    """Base of every error this package's client raises."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        suffix = f" (request_id={self.request_id})" if self.request_id else ""
        return f"{self.message}{suffix}"


@dataclass(frozen=True, slots=True)
class FieldIssue:
    """One schema violation: the field and the rule it breaks, e.g. `num_images: must be <= 4`."""

    field: str
    rule: str

    def __str__(self) -> str:
        return f"{self.field}: {self.rule}"


class InvalidEditRequest(RunComfyError, ValueError):
    """The request breaks the schema; it is never sent.

    Example::

        >>> str(InvalidEditRequest([FieldIssue("prompt", "must not be blank")]))
        'invalid edit request: prompt: must not be blank'
    """

    def __init__(self, issues: Sequence[FieldIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("invalid edit request: " + "; ".join(str(i) for i in self.issues))


class MalformedResponseError(RunComfyError):
    """The API answered with a body this client cannot interpret."""


class UnknownJobStateError(RunComfyError):
    """The API reported a state outside in_queue/in_progress/completed/cancelled/failed."""

    def __init__(self, state: str, *, request_id: str | None = None) -> None:
        self.state = state
        super().__init__(f"unknown job state {state[:40]!r}", request_id=request_id)


class JobDeadlineExceeded(RunComfyError):
    """The job did not finish within its deadline; a cancel was sent for it."""


class TransportError(RunComfyError):
    """No usable HTTP answer: connection refused or dropped, or a timeout."""

    def __init__(self, message: str, *, request_id: str | None = None, sent: bool = True) -> None:
        super().__init__(message, request_id=request_id)
        self.sent = sent


class SubmissionOutcomeUnknown(TransportError):
    """A submit's answer does not prove that no job exists (see the module docstring).

    The API may have created (and will bill) a job: the answer was lost, or it was a
    5xx/408, or a 2xx without a usable request id. `status_code` is the HTTP status
    when an answer arrived, else None. The client does not resubmit; the caller
    decides, and should count and cap it like a paid attempt.

    Example::

        >>> error = SubmissionOutcomeUnknown("HTTP 502; the API may have created a job",
        ...                                  status_code=502)
        >>> error.sent, error.status_code
        (True, 502)
    """

    def __init__(
        self, message: str, *, request_id: str | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.status_code = status_code


class APIError(RunComfyError):
    """The API answered with an error."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        error_code: str | None = None,
        request_id: str | None = None,
        detail: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.status_code = status_code
        self.error_code = error_code
        self.detail = detail
        self.retry_after = retry_after

    @property
    def family(self) -> int:
        """The error's HTTP-like family: its numeric code's (`400002` -> 400), else the status.

        >>> ServerError("boom", status_code=200, error_code="500001").family
        500
        """
        return code_family(self.error_code) or self.status_code

    def __str__(self) -> str:
        code = f" {self.error_code}" if self.error_code else ""
        base = f"HTTP {self.status_code}{code}: {self.message}"
        return f"{base} (request_id={self.request_id})" if self.request_id else base


class BadRequestError(APIError):
    """400: the API refused the request as malformed."""


class ResultNotReadyError(APIError):
    """400005 on `/result`: the job has not ended, or its result is not written yet; poll again."""


class AccountRefusedError(APIError):
    """The account, not this row, is refused: no other job can succeed until a person acts.

    `action` says what happened and what to do, in words a person can act on::

        >>> error = InsufficientCreditError("Insufficient resources", status_code=400,
        ...                                 error_code="400002")
        >>> error.action
        'account balance too low (400002): top up the account and re-run'
    """

    @property
    def action(self) -> str:
        described = describe_code(self.error_code)
        if described is not None:
            return described
        if self.status_code == 402:
            return "account balance too low (HTTP 402): top up the account and re-run"
        return (
            f"token or account refused (HTTP {self.status_code}): check RUNCOMFY_API_TOKEN "
            "and the account, then re-run"
        )


class AuthenticationError(AccountRefusedError):
    """401/403, 400004, 401xxx, 403001, 403003: the token is missing, wrong, or not allowed."""


class InsufficientCreditError(AccountRefusedError):
    """402 or 400002: the account's balance cannot pay for this job."""


class NotFoundError(APIError):
    """404: the request id (or route) is unknown to the API."""


class JobLostError(NotFoundError):
    """The API answered 404 for a job it had acknowledged, on status and result, past the grace.

    A single 404 is not enough (an API may briefly not find a job it just created);
    `AsyncRunComfyClient.wait` raises this only after `lost_job_grace` seconds of
    404s on both `/status` and `/result`. A resubmit after it may pay for a duplicate.
    """


class RequestRejectedError(APIError):
    """422: the API's schema validation refused the request; `detail` says why."""


class RateLimitError(APIError):
    """429: too many requests; `retry_after` holds the server's wish, if it gave one."""


class ServerError(APIError):
    """408 or 5xx: the API failed or timed out on its side."""


SUBMIT_NO_JOB_STATUS_CODES = NO_JOB_FAMILIES
"""HTTP answers (and code families) to a submit that prove the API created no job."""


def submit_error_proves_no_job(status_code: int, error_code: Any = None) -> bool:
    """Whether a submit answered with this error surely created no job.

    A numeric RunComfy code decides by its family, whatever the HTTP status (RunComfy
    sends some errors with HTTP 200); without one, the HTTP status decides. Anything not
    in `SUBMIT_NO_JOB_STATUS_CODES` (5xx, 408, 409, 3xx, a 2xx without a code) leaves the
    outcome unknown.

    >>> submit_error_proves_no_job(422), submit_error_proves_no_job(429)
    (True, True)
    >>> submit_error_proves_no_job(502), submit_error_proves_no_job(200)
    (False, False)
    >>> submit_error_proves_no_job(200, 400002), submit_error_proves_no_job(200, "500001")
    (True, False)
    """
    family = code_family(error_code)
    if family is not None:
        return family in SUBMIT_NO_JOB_STATUS_CODES
    return status_code in SUBMIT_NO_JOB_STATUS_CODES


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientCreditError,
    403: AuthenticationError,
    404: NotFoundError,
    408: ServerError,
    422: RequestRejectedError,
    429: RateLimitError,
}

_BY_ERROR_CODE: dict[str, type[APIError]] = {
    "unauthorized": AuthenticationError,
    "invalid_token": AuthenticationError,
    "forbidden": AuthenticationError,
    "insufficient_credit": InsufficientCreditError,
    "insufficient_credits": InsufficientCreditError,
    "insufficient_balance": InsufficientCreditError,
    "not_found": NotFoundError,
    "request_not_found": NotFoundError,
    "validation_error": RequestRejectedError,
    "rate_limited": RateLimitError,
    "too_many_requests": RateLimitError,
}


def error_for_response(
    status_code: int,
    body: Any,
    *,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> APIError:
    """Map an HTTP error answer (or any answer whose body holds `error_code`) to an `APIError`.

    A numeric RunComfy code decides first (see `flux2_pipeline.runcomfy.codes`), then the
    HTTP status, then a textual code.

    Example::

        >>> body = {"error_code": "INSUFFICIENT_CREDIT", "error_message": "top up"}
        >>> type(error_for_response(402, body)).__name__
        'InsufficientCreditError'
        >>> type(error_for_response(200, {"error_code": 500001})).__name__
        'ServerError'
        >>> type(error_for_response(400, {"error_code": 400005})).__name__
        'ResultNotReadyError'
    """
    data: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    error_code = data.get("error_code")
    code_text = str(error_code) if error_code is not None else None
    message = data.get("error_message") or data.get("message")
    if not message and isinstance(data.get("error"), str):
        message = data["error"]
    if not message:
        message = body.strip()[:200] if isinstance(body, str) and body.strip() else "no message"
    detail = data.get("detail")
    rid = request_id or (str(data["request_id"]) if data.get("request_id") else None)

    cls = _class_for_code(error_code)
    if cls is None:
        cls = _BY_STATUS.get(status_code)
    if cls is None and status_code >= 500:
        cls = ServerError
    if cls is None and code_text:
        cls = _BY_ERROR_CODE.get(code_text.lower())
    if cls is None:
        cls = ServerError if status_code >= 500 else BadRequestError
    return cls(
        str(message),
        status_code=status_code,
        error_code=code_text,
        request_id=rid,
        detail=detail,
        retry_after=retry_after,
    )


def _class_for_code(error_code: Any) -> type[APIError] | None:
    code = numeric_code(error_code)
    family = code_family(code)
    if code is None or family is None:
        return None
    if code == RESULT_NOT_READY:
        return ResultNotReadyError
    if code == INSUFFICIENT_BALANCE:
        return InsufficientCreditError
    if is_account_code(code):
        return AuthenticationError
    if family >= 500:
        return ServerError
    # A code's family reads as an HTTP status would.
    return _BY_STATUS.get(family, BadRequestError)


def is_account_refusal(error: APIError) -> bool:
    """True when the error refuses the account (codes or HTTP 401/402/403), not one row.

    >>> is_account_refusal(error_for_response(200, {"error_code": 403003}))
    True
    >>> is_account_refusal(error_for_response(422, {"error_code": 422001}))
    False
    """
    if isinstance(error, AccountRefusedError):
        return True
    return code_family(error.error_code) is None and error.status_code in ACCOUNT_HTTP_STATUSES
