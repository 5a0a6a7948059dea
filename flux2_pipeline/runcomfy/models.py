"""The FLUX.2 [dev] edit schema, job states and results, parsed in one place.

`EditRequest` is the API's input schema, validated before anything is sent::

    >>> req = EditRequest(prompt="make it night", image_urls=["https://x.test/a.png"])
    >>> req.num_inference_steps, req.image_size
    (28, 'square_hd')

Response bodies become small frozen dataclasses through `parse_submit`,
`parse_status`, `parse_result` and `parse_cancel`; unknown extra fields are ignored,
unknown job states are refused with `UnknownJobStateError`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flux2_pipeline.runcomfy.errors import (
    FieldIssue,
    InvalidEditRequest,
    MalformedResponseError,
    UnknownJobStateError,
)

MODEL_PATH = "/v1/models/blackforestlabs/flux-2/dev/edit"
MAX_IMAGE_URLS = 3

ImageSize = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
OutputFormat = Literal["jpeg", "png", "webp"]

IMAGE_SIZE_PIXELS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
"""Pixel size (width, height) of each `image_size` preset."""


class EditRequest(BaseModel):
    """One FLUX.2 [dev] edit job, validated against the API schema.

    More than three `image_urls` are cut to the first three and the cut is
    recorded in `warnings`; every other violation raises `InvalidEditRequest`
    naming the field and the rule (use `EditRequest.parse` for that error type).

    Example::

        >>> EditRequest.parse({"prompt": "add a hat", "image_urls": "https://x.test/cat.png"})
        EditRequest(prompt='add a hat', image_urls=('https://x.test/cat.png',), ...)
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=False)

    prompt: str = Field(min_length=1, description="The edit instruction.")
    image_urls: tuple[str, ...] = Field(
        min_length=1, description="1 to 3 reference image URLs (http or https)."
    )
    guidance_scale: float = Field(default=2.5, ge=0, le=20)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    num_inference_steps: int = Field(default=28, ge=4, le=50)
    image_size: ImageSize = "square_hd"
    num_images: int = Field(default=1, ge=1, le=4)
    enable_prompt_expansion: bool = False
    output_format: OutputFormat = "png"
    warnings: tuple[str, ...] = Field(default=(), exclude=True, repr=False)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("image_urls", mode="before")
    @classmethod
    def _one_url_is_a_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("image_urls")
    @classmethod
    def _http_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for position, url in enumerate(value):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"item {position} must be an http(s) URL, got {url[:80]!r}")
        return value

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> EditRequest:
        """Validate a mapping (a table row, a JSON body) into an `EditRequest`.

        Null parameters take the schema default; more than three URLs are cut.

        Example::

            >>> urls = ["https://x.test/a.png"] * 5
            >>> EditRequest.parse({"prompt": "p", "image_urls": urls}).warnings
            ('image_urls: 5 URLs given, kept the first 3',)
        """
        values = {key: value for key, value in data.items() if value is not None}
        warnings: list[str] = []
        urls = values.get("image_urls")
        if isinstance(urls, Sequence) and not isinstance(urls, str | bytes):
            urls = list(urls)
            if len(urls) > MAX_IMAGE_URLS:
                warnings.append(
                    f"image_urls: {len(urls)} URLs given, kept the first {MAX_IMAGE_URLS}"
                )
                urls = urls[:MAX_IMAGE_URLS]
            values["image_urls"] = urls
        for name, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidEditRequest([FieldIssue(name, "must be a finite number")])
        if warnings:
            values["warnings"] = tuple(warnings)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise InvalidEditRequest(_issues_from(exc)) from None

    def payload(self) -> dict[str, Any]:
        """The JSON body sent to the API."""
        body = self.model_dump(mode="json")
        body["image_urls"] = list(self.image_urls)
        return body

    def fingerprint(self) -> str:
        """A stable sha256 of the effective request: same inputs, same fingerprint."""
        canonical = json.dumps(self.payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


PARAMETER_NAMES: tuple[str, ...] = tuple(
    name for name in EditRequest.model_fields if name not in ("prompt", "image_urls", "warnings")
)
"""Every optional edit parameter, in the API schema's order: declared once, on `EditRequest`."""

PARAMETER_DEFAULTS: dict[str, Any] = {
    name: EditRequest.model_fields[name].default for name in PARAMETER_NAMES
}
"""The API schema's default for every optional parameter (read off `EditRequest`)."""


def _issues_from(exc: ValidationError) -> list[FieldIssue]:
    issues = []
    for error in exc.errors(include_url=False, include_input=False):
        location = error.get("loc", ())
        name = str(location[0]) if location else "request"
        message = str(error.get("msg", "is invalid"))
        message = message.removeprefix("Value error, ")
        kind = error.get("type")
        if kind == "extra_forbidden":
            message = "is not a parameter of this model"
        elif kind == "string_too_short":
            message = "must not be empty"
        elif kind == "too_short" and name == "image_urls":
            message = f"must hold 1 to {MAX_IMAGE_URLS} URLs, got none"
        issues.append(FieldIssue(name, message[:1].lower() + message[1:]))
    return issues


class JobState(StrEnum):
    """Every state a job can be in; `STATE_SPELLINGS` maps the service's other words onto them.

    >>> [parse_state(word).value for word in ("succeeded", "Canceled", "processing")]
    ['completed', 'cancelled', 'in_progress']
    """

    IN_QUEUE = "in_queue"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.CANCELLED, JobState.FAILED)


STATE_SPELLINGS: dict[str, JobState] = {
    "succeeded": JobState.COMPLETED,
    "canceled": JobState.CANCELLED,
    "pending": JobState.IN_QUEUE,
    "waiting": JobState.IN_QUEUE,
    "queued": JobState.IN_QUEUE,
    "starting": JobState.IN_PROGRESS,
    "processing": JobState.IN_PROGRESS,
}
"""Other words RunComfy's own clients accept for a state (its CLI, MCP server and nodes)."""


def parse_state(raw: Any, request_id: str | None = None) -> JobState:
    """The one place a state string becomes a `JobState`; unknown ones raise.

    An unknown state is never a reason to give a paid job up: `AsyncRunComfyClient.wait`
    keeps polling it to the job's deadline.
    """
    text = str(raw).strip().lower()
    try:
        return JobState(text)
    except ValueError:
        pass
    state = STATE_SPELLINGS.get(text)
    if state is None:
        raise UnknownJobStateError(str(raw), request_id=request_id)
    return state


@dataclass(frozen=True, slots=True)
class JobHandle:
    """What a submit returns: the job's id and the URLs the API gave for it."""

    request_id: str
    status_url: str | None = None
    result_url: str | None = None
    cancel_url: str | None = None


@dataclass(frozen=True, slots=True)
class JobStatus:
    """One status poll: the state, while queued the queue position, and a failed job's error."""

    request_id: str
    state: JobState
    queue_position: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    """The answer to a cancel: `cancelled` is True only if the job was stopped."""

    request_id: str
    cancelled: bool
    state: JobState | None = None


@dataclass(frozen=True, slots=True)
class EditResult:
    """The end of one job: its state, its images and what it cost.

    `ok` is True only for a completed job with at least one image URL.
    """

    request_id: str
    state: JobState
    output_urls: tuple[str, ...] = ()
    error: str | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    cost_usd: float | None = None
    submitted_at: datetime | None = None
    status_calls: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.state is JobState.COMPLETED and bool(self.output_urls) and not self.error


def _require_mapping(body: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise MalformedResponseError(f"{what} response is not a JSON object")
    return body


def _request_id(body: Mapping[str, Any], what: str, fallback: str | None = None) -> str:
    value = body.get("request_id") or fallback
    if not value:
        raise MalformedResponseError(f"{what} response has no request_id")
    return str(value)


MAX_REQUEST_ID_LENGTH = 256
"""Longest request id a submit answer may carry; a longer one is not an id this client trusts."""


def _usable_request_id(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MalformedResponseError("submit response has no request_id")
    if len(value) > MAX_REQUEST_ID_LENGTH or not value.isprintable():
        raise MalformedResponseError("submit response has an unusable request_id")
    return value


def parse_submit(body: Any) -> JobHandle:
    """Parse `{request_id, status_url, result_url, cancel_url}`.

    The request id must be a non-blank string of printable characters (at most
    `MAX_REQUEST_ID_LENGTH`); anything else raises `MalformedResponseError`.
    """
    data = _require_mapping(body, "submit")
    return JobHandle(
        request_id=_usable_request_id(data.get("request_id")),
        status_url=_optional_str(data.get("status_url")),
        result_url=_optional_str(data.get("result_url")),
        cancel_url=_optional_str(data.get("cancel_url")),
    )


def parse_status(body: Any, request_id: str | None = None) -> JobStatus:
    """Parse `{request_id, status, queue_position?}`."""
    data = _require_mapping(body, "status")
    rid = _request_id(data, "status", request_id)
    position = data.get("queue_position")
    return JobStatus(
        request_id=rid,
        state=parse_state(data.get("status"), rid),
        queue_position=int(position) if isinstance(position, int | float) else None,
        error=error_text(data.get("error")),
    )


def parse_cancel(body: Any, request_id: str | None = None) -> CancelOutcome:
    """Parse `{request_id, status, outcome}`; outcome is `cancelled` or `not_cancellable`."""
    data = _require_mapping(body, "cancel")
    rid = _request_id(data, "cancel", request_id)
    raw_state = data.get("status")
    state = parse_state(raw_state, rid) if raw_state else None
    outcome = str(data.get("outcome", "")).lower()
    return CancelOutcome(
        request_id=rid,
        cancelled=outcome == "cancelled" or (not outcome and state is JobState.CANCELLED),
        state=state,
    )


def parse_result(body: Any, request_id: str | None = None) -> EditResult:
    """Parse `{request_id, status, output, error, created_at, finished_at}`.

    `output` holds `image` (one URL) or `images` (a list of URLs or of
    `{"url": ...}` objects). A completed job that reports an error or has no
    image is returned with `ok == False` and an explanatory `error`.
    """
    data = _require_mapping(body, "result")
    rid = _request_id(data, "result", request_id)
    urls = _output_urls(data.get("output"))
    error = error_text(data.get("error"))
    state = (
        parse_state(data.get("status"), rid) if "status" in data else _implied_state(urls, error)
    )
    if state is JobState.COMPLETED and not error and not urls:
        error = "the job completed without any output image"
    return EditResult(
        request_id=rid,
        state=state,
        output_urls=urls,
        error=error,
        created_at=parse_timestamp(data.get("created_at")),
        finished_at=parse_timestamp(data.get("finished_at")),
        cost_usd=_cost(data),
        extra={k: v for k, v in data.items() if k not in _RESULT_FIELDS},
    )


_RESULT_FIELDS = {"request_id", "status", "output", "error", "created_at", "finished_at"}


def _implied_state(urls: tuple[str, ...], error: str | None) -> JobState:
    # A result without a status: its images or its error say how it ended.
    if error:
        return JobState.FAILED
    if urls:
        return JobState.COMPLETED
    raise MalformedResponseError("result response has no status, output or error")


def _output_urls(output: Any) -> tuple[str, ...]:
    if not isinstance(output, Mapping):
        return ()
    items: list[Any] = []
    if output.get("images") is not None:
        images = output["images"]
        items.extend(images if isinstance(images, list) else [images])
    elif output.get("image") is not None:
        items.append(output["image"])
    urls = []
    for item in items:
        url = item.get("url") if isinstance(item, Mapping) else item
        if isinstance(url, str) and url:
            urls.append(url)
    return tuple(urls)


ERROR_TEXT_LIMIT = 2000
"""Longest job error kept: a service may quote a whole traceback."""


def error_text(error: Any) -> str | None:
    """A failed job's `error` in words: a string, an object or a list of either.

    >>> error_text({"error_code": 422001, "error_message": "bad image"})
    '422001: bad image'
    >>> error_text(["first", {"message": "second"}])
    'first; second'
    """
    if error is None or error == "" or error == {} or error == []:
        return None
    if isinstance(error, list | tuple):
        parts = [text for item in error if (text := error_text(item))]
        return "; ".join(parts)[:ERROR_TEXT_LIMIT] or None
    if isinstance(error, Mapping):
        message = error.get("error_message") or error.get("message") or error.get("detail")
        code = error.get("error_code") or error.get("code")
        if message is not None and not isinstance(message, str):
            message = error_text(message)
        text = str(message) if message else json.dumps(dict(error), sort_keys=True, default=str)
        return (f"{code}: {text}" if code else text)[:ERROR_TEXT_LIMIT]
    return str(error)[:ERROR_TEXT_LIMIT]


def _cost(data: Mapping[str, Any]) -> float | None:
    # RunComfy reports `cost` (USD) when asked with include_cost=true.
    for key in ("cost", "cost_usd"):
        value = data.get(key)
        if isinstance(value, Mapping):
            value = value.get("usd") or value.get("amount")
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        ):
            return float(value)
    return None


def _optional_str(value: Any) -> str | None:
    return str(value) if value else None


def parse_timestamp(value: Any) -> datetime | None:
    """ISO-8601 strings or epoch seconds to an aware UTC datetime; anything else to None."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, int | float):
            return datetime.fromtimestamp(float(value), tz=UTC)
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
