"""How the emulator words its answers: RunComfy's documented dialect, or the seed's.

The documented dialect follows RunComfy's public clients and its error-code page: numeric
`error_code`s, `succeeded` and `canceled`, 202 submits, `cost` on results. The seed
dialect is the product page as first read (string codes, `completed`, `cancelled`, 200
submits, `cost_usd`), kept so that older behaviour stays testable::

    >>> error_body("documented", "NOT_FOUND", "no job with request_id 'x'")
    {'error_code': 404001, 'error_message': "no job with request_id 'x'"}
    >>> error_body("seed", "NOT_FOUND", "no job with request_id 'x'")["error_code"]
    'NOT_FOUND'
    >>> state_word("documented", JobState.CANCELLED)
    'canceled'
"""

from __future__ import annotations

from typing import Any, Literal

from flux2_pipeline.runcomfy.models import JobState

__all__ = [
    "BALANCE_ROUTES",
    "DIALECTS",
    "DOCUMENTED",
    "ERROR_CODES",
    "ERROR_SHAPES",
    "MODEL_ROUTES",
    "SEED",
    "error_body",
    "error_code",
    "job_error",
    "state_word",
]

Dialect = Literal["documented", "seed"]
DOCUMENTED: Dialect = "documented"
SEED: Dialect = "seed"
DIALECTS: tuple[str, ...] = (DOCUMENTED, SEED)

ERROR_SHAPES: tuple[str, ...] = ("string", "object", "list")
"""How a failed job's `error` is given: the text alone (as RunComfy's Zapier tests show
it), an `{error_code, error_message}` object, or a list of texts."""

MODEL_ROUTES: tuple[str, ...] = ("ok", "missing", "error")
"""The model route answers its description, 404 404001, or 500 500001."""

BALANCE_ROUTES: tuple[str, ...] = ("ok", "missing", "error", "denied")
"""The balance route answers the balance, 404 404001, 500 500001, or HTTP 200 403003."""

ERROR_CODES: dict[str, int] = {
    "BAD_MODEL_ID": 400001,
    "INSUFFICIENT_RESOURCES": 400002,
    "UNAUTHORIZED": 400004,
    "RESULT_NOT_READY": 400005,
    "PERMISSION_DENIED": 403001,
    "ACCOUNT_DENIED": 403003,
    "NOT_FOUND": 404001,
    "METHOD_NOT_ALLOWED": 405001,
    "PAYLOAD_TOO_LARGE": 413001,
    "VALIDATION_ERROR": 422001,
    "RATE_LIMITED": 429001,
    "QUEUE_FULL": 429001,
    "INTERNAL_ERROR": 500001,
    "BAD_GATEWAY": 500001,
    "SERVICE_UNAVAILABLE": 500001,
}
"""The seed's string code -> RunComfy's numeric code. 400001 to 404001, 422001 and 500001
are on RunComfy's error-code page; 405001, 413001 and 429001 follow its pattern (HTTP
status x 1000 + 1) where the page names no code."""

MODEL_FAILED = "Model run failed"
"""A failed job's error as RunComfy's own client tests show it."""


def error_code(dialect: str, name: str, status: int = 500) -> int | str:
    """The `error_code` of error `name` in `dialect`; an unlisted name in the documented
    dialect gets `status * 1000 + 1`.

    >>> error_code("documented", "RATE_LIMITED"), error_code("seed", "RATE_LIMITED")
    (429001, 'RATE_LIMITED')
    """
    if dialect == SEED:
        return name
    return ERROR_CODES.get(name, status * 1000 + 1)


def error_body(
    dialect: str, name: str, message: str, *, status: int = 500, detail: Any = None
) -> dict[str, Any]:
    """`{error_code, error_message[, detail]}` as the dialect spells it."""
    body: dict[str, Any] = {
        "error_code": error_code(dialect, name, status),
        "error_message": message,
    }
    if detail is not None:
        body["detail"] = detail
    return body


def state_word(dialect: str, state: JobState, *, succeeded: bool = False) -> str:
    """How the dialect spells `state`; `succeeded` picks `succeeded` for `completed`.

    >>> state_word("documented", JobState.COMPLETED, succeeded=True)
    'succeeded'
    """
    if dialect == SEED:
        return state.value
    if state is JobState.CANCELLED:
        return "canceled"
    if state is JobState.COMPLETED and succeeded:
        return "succeeded"
    return state.value


def job_error(
    dialect: str, shape: str, seed_error: dict[str, str], message: str
) -> str | dict[str, Any] | list[str]:
    """A failed job's `error`: the seed's object, or `message` in the documented `shape`.

    >>> job_error("documented", "object", {"error_code": "MODEL_ERROR"}, "Model run failed")
    {'error_code': 500001, 'error_message': 'Model run failed'}
    """
    if dialect == SEED:
        return dict(seed_error)
    if shape == "object":
        return {"error_code": ERROR_CODES["INTERNAL_ERROR"], "error_message": message}
    if shape == "list":
        return [message]
    return message
