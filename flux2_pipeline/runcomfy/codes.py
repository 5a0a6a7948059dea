"""RunComfy's numeric error codes and what each means for a client, declared once.

RunComfy answers errors as `{error_code, error_message, detail?}`, sometimes with HTTP
200. The code is a six-digit number whose first three digits are its family, an HTTP
status in spirit (`400002` is in family 400, `500001` in family 500), whatever status the
HTTP answer carried. Each published code, and what this client does with it
(`errors.error_for_response` applies it), is tabled in docs/real-api.md.

Example::

    >>> code_family(400002), code_family("500001"), code_family("QUEUE_FULL")
    (400, 500, None)
    >>> describe_code(400002)
    'account balance too low (400002): top up the account and re-run'
"""

from __future__ import annotations

from typing import Any

RESULT_NOT_READY = 400005
"""`/result` of a job that has not ended (or whose result is not written yet)."""

INSUFFICIENT_BALANCE = 400002
ACCOUNT_ERROR = 400004
PERMISSION_DENIED = 403001
TOKEN_NOT_ALLOWED = 403003
REQUEST_NOT_FOUND = 404001
VALIDATION_ERROR = 422001
INTERNAL_ERROR = 500001

ACCOUNT_CODES = frozenset(
    {INSUFFICIENT_BALANCE, ACCOUNT_ERROR, PERMISSION_DENIED, TOKEN_NOT_ALLOWED}
)
"""Codes that refuse the account itself (with the whole 401 family); see `is_account_code`."""

ACCOUNT_HTTP_STATUSES = frozenset({401, 402, 403})
"""HTTP statuses that refuse the account when the body carries no code of its own."""

NO_JOB_FAMILIES = frozenset({400, 401, 402, 403, 404, 422, 429})
"""Code families whose answer to a submit proves that the service created no job."""

_ACTIONS: dict[int, str] = {
    400001: "model id not valid ({code}): check RUNCOMFY_BASE_URL and the model path",
    INSUFFICIENT_BALANCE: "account balance too low ({code}): top up the account and re-run",
    ACCOUNT_ERROR: "account or token refused ({code}): check RUNCOMFY_API_TOKEN and that "
    "the account is active, then re-run",
    RESULT_NOT_READY: "result not ready yet ({code})",
    PERMISSION_DENIED: "permission denied ({code}): the token may not use this model",
    TOKEN_NOT_ALLOWED: "token not allowed ({code}): the token may not use this API",
    REQUEST_NOT_FOUND: "request id missing, deleted or expired ({code})",
    VALIDATION_ERROR: "input refused by the model's schema ({code})",
    INTERNAL_ERROR: "internal error of the service ({code})",
}


def numeric_code(value: Any) -> int | None:
    """The error code as a number when it is one (`400002` or `"400002"`), else None.

    >>> numeric_code(" 400005 "), numeric_code(True), numeric_code("NOT_FOUND")
    (400005, None, None)
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def code_family(value: Any) -> int | None:
    """The HTTP-like family of a RunComfy code: its first three digits (None if not numeric)."""
    code = numeric_code(value)
    if code is None or not 100_000 <= code <= 599_999:
        return None
    return code // 1000


def is_account_code(value: Any) -> bool:
    """True for codes that refuse the account, not one row (`ACCOUNT_CODES`, family 401).

    >>> is_account_code(400002), is_account_code(401003), is_account_code(422001)
    (True, True, False)
    """
    code = numeric_code(value)
    return code is not None and (code in ACCOUNT_CODES or code_family(code) == 401)


def describe_code(value: Any) -> str | None:
    """What a person should read about a code and what to do; None for codes we don't know.

    Codes of a known family but an unlisted number get their family's words.
    """
    code = numeric_code(value)
    if code is None:
        return None
    template = _ACTIONS.get(code)
    if template is None and code_family(code) == 401:
        template = _ACTIONS[ACCOUNT_ERROR]
    return template.format(code=code) if template else None


INPUT_FAULT_CODES = frozenset(
    {
        str(VALIDATION_ERROR),
        "IMAGE_FETCH_FAILED",
        "INVALID_IMAGE",
        "INVALID_INPUT",
        "BAD_INPUT",
        "UNSUPPORTED_IMAGE",
        "CONTENT_POLICY_VIOLATION",
        "NSFW_CONTENT_DETECTED",
    }
)
"""Codes at the head of a failed job's error that blame its input."""

INPUT_FAULT_PHRASES = (
    "failed to load image",
    "could not load image",
    "cannot load image",
    "unable to load image",
    "failed to download",
    "could not download",
    "unable to download",
    "failed to fetch",
    "could not fetch",
    "cannot identify image",
    "invalid image",
    "unsupported image",
    "not a valid image",
    "image url",
    "image_url",
    "content policy",
    "nsfw",
)
"""What a failed job says, in the service's words, when its reference images or prompt are
at fault: submitting the same row again cannot help."""


def failure_blames_input(error: str | None) -> bool:
    """True when a failed job's error says its input is at fault, by code or by words.

    >>> failure_blames_input("IMAGE_FETCH_FAILED: http://x/a.png answered 404")
    True
    >>> failure_blames_input("Failed to load image from https://x.test/a.png: HTTP 403")
    True
    >>> failure_blames_input("500001: internal error")
    False
    """
    if not error:
        return False
    head = error.split(":", 1)[0].strip().upper()
    if head in INPUT_FAULT_CODES:
        return True
    lowered = error.lower()
    return any(phrase in lowered for phrase in INPUT_FAULT_PHRASES)
