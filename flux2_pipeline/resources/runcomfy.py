"""`RunComfyResource`: the API client as a Dagster resource.

The live `AsyncRunComfyClient` runs on an event loop in a thread of its own, made
in `setup_for_execution` and closed in `teardown_after_execution`. Assets hand it
coroutines through `run`; when Dagster interrupts the step (a run stopped from the
UI), `run` cancels the coroutine, which cancels queued jobs through the API,
before the interrupt propagates.

Example::

    defs = Definitions(
        assets=[flux2_edits],
        resources={"flux2_runcomfy": RunComfyResource(api_token=EnvVar("RUNCOMFY_API_TOKEN"))},
    )
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import urlsplit

from dagster import (
    ConfigurableResource,
    DagsterExecutionInterruptedError,
    EnvVar,
    InitResourceContext,
)
from pydantic import Field, PrivateAttr, field_validator

from flux2_pipeline.resources.catalogue import setting
from flux2_pipeline.resources.errors import SettingsError
from flux2_pipeline.runcomfy import (
    DEFAULT_ACCOUNT_BASE_URL,
    DEFAULT_BASE_URL,
    MODEL_PATH,
    PARAMETER_NAMES,
    AsyncRunComfyClient,
    EditRequest,
    EditResult,
    InvalidEditRequest,
    PollSchedule,
    RetryPolicy,
)

T = TypeVar("T")
BalanceCheck: TypeAlias = Literal["stop", "warn", "off"]

MAX_CONCURRENCY_LIMIT = 4096
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_PROBE_ROW = {"prompt": "defaults check", "image_urls": ["https://example.test/a.png"]}

CLEANUP_SECONDS = 30.0
"""How long a stopped run waits for in-flight jobs to be cancelled and recorded."""


def _http_url(value: str, default: str) -> str:
    value = value.strip() or default
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL such as {default}, got {value!r}")
    return value.rstrip("/")


def is_loopback(url: str) -> bool:
    """True for http(s) URLs on 127.0.0.1, localhost or ::1 (the emulator needs no token)."""
    return (urlsplit(url).hostname or "") in LOOPBACK_HOSTS


def check_parameter_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """`defaults` if every key is an `EditRequest` parameter and every value fits its rule.

    >>> check_parameter_defaults({"image_size": "landscape_4_3"})
    {'image_size': 'landscape_4_3'}
    """
    unknown = sorted(set(defaults) - set(PARAMETER_NAMES))
    if unknown:
        raise ValueError(
            f"has no edit parameter {unknown[0]!r} (choose from {', '.join(PARAMETER_NAMES)})"
        )
    try:
        EditRequest.parse({**_PROBE_ROW, **defaults})
    except InvalidEditRequest as exc:
        raise ValueError(
            "breaks the edit schema: " + "; ".join(str(issue) for issue in exc.issues)
        ) from None
    return dict(defaults)


class RunInterrupted(Exception):
    """The step was interrupted; in-flight jobs were cancelled (or left to finish) first.

    An ordinary exception on purpose: Dagster retries interrupts when a RetryPolicy is
    set, which would undo a user's "stop"; the asset turns this into a final failure.
    """


class RunComfyResource(ConfigurableResource):  # type: ignore[type-arg]
    """The RunComfy FLUX.2 [dev] edit API, with retries, polling and cancellation."""

    api_token: str | None = Field(
        default=None,
        description="The API's bearer token; never printed, logged or stored. Optional only "
        "for a loopback emulator.",
        json_schema_extra=setting("RUNCOMFY_API_TOKEN", secret=True),
    )
    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        description="The API root (the model path is appended); a loopback URL for the "
        "flux2-pipeline emulator.",
        json_schema_extra=setting("RUNCOMFY_BASE_URL"),
    )
    account_base_url: str | None = Field(
        default=None,
        description="Root of RunComfy's account API, where the balance is read (GET "
        "/prod/v2/balance); unset: https://api.runcomfy.net, or base_url on loopback.",
        json_schema_extra=setting("RUNCOMFY_ACCOUNT_BASE_URL"),
    )
    balance_check: BalanceCheck = Field(
        default="stop",
        description="Before the first submit, the estimated cost of the rows still to pay "
        "against the account's balance: stop (do not start when it cannot be covered), "
        "warn, or off (no call).",
        json_schema_extra=setting("FLUX2_BALANCE_CHECK"),
    )
    model_path: str = Field(default=MODEL_PATH, description="Path of the edit model endpoint.")
    max_concurrency: int = Field(
        default=8,
        ge=1,
        le=MAX_CONCURRENCY_LIMIT,
        description="Most API jobs in flight at once from one step.",
        json_schema_extra=setting("FLUX2_MAX_CONCURRENCY"),
    )
    request_timeout: float = Field(default=30.0, gt=0, description="Seconds per HTTP call.")
    job_deadline: float = Field(
        default=1800.0,
        gt=0,
        description="Seconds from submit to a terminal state before the job is cancelled.",
    )
    poll_min_interval: float | None = Field(
        default=None,
        gt=0,
        description="Shortest poll wait (s); default 0.1 on loopback, 1.0 against a real host.",
    )
    poll_max_interval: float | None = Field(
        default=None, gt=0, description="Longest poll wait (s); default 5."
    )
    poll_fraction: float | None = Field(
        default=None,
        ge=0,
        description="Poll wait as a fraction of the job's age; default 0.15 on loopback, 0.4 "
        "against a real host.",
    )
    http_attempts: int = Field(
        default=6, ge=1, description="Tries per HTTP call for retryable failures."
    )
    attempts_per_run: int = Field(
        default=3, ge=1, description="Paid submissions per row within one run."
    )
    max_attempts: int = Field(
        default=9, ge=1, description="Paid submissions per row across all runs."
    )
    presign_expiry: int = Field(
        default=3600,
        ge=60,
        le=7 * 24 * 3600,
        description="Seconds a pre-signed URL for an s3:// reference image stays valid.",
    )
    account_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Most jobs the account may have queued or running at once, summed over "
        "every run, process and machine sharing the ledger (unset: no shared cap).",
        json_schema_extra=setting("FLUX2_ACCOUNT_CONCURRENCY"),
    )
    price_per_image_usd: float | None = Field(
        default=None,
        ge=0,
        description="The price of one output image, reserved under a budget and used for "
        "estimates until the API reports a job's cost (unset: the model's base_price_usd).",
        json_schema_extra=setting("FLUX2_PRICE_PER_IMAGE_USD"),
    )
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Edit parameters for rows that leave them null, e.g. "
        "{image_size: landscape_4_3}; any parameter of EditRequest, checked against its "
        "schema. A row's own value wins.",
        json_schema_extra=setting(None),
    )

    _loop: asyncio.AbstractEventLoop | None = PrivateAttr(default=None)
    _thread: threading.Thread | None = PrivateAttr(default=None)
    _client: AsyncRunComfyClient | None = PrivateAttr(default=None)

    def __repr__(self) -> str:
        return f"RunComfyResource(base_url={self.base_url!r})"

    __str__ = __repr__

    @field_validator("api_token")
    @classmethod
    def _token_shape(cls, value: str | None) -> str | None:
        if not value:
            return None
        if value != value.strip() or any(char.isspace() for char in value):
            raise ValueError("must not contain spaces or line breaks")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _http_url(value, DEFAULT_BASE_URL)

    @field_validator("account_base_url")
    @classmethod
    def _account_http_url(cls, value: str | None) -> str | None:
        return _http_url(value, DEFAULT_ACCOUNT_BASE_URL) if value and value.strip() else None

    @field_validator("defaults")
    @classmethod
    def _edit_parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_parameter_defaults(value)

    def parameter_defaults(self) -> dict[str, Any]:
        """The configured per-parameter defaults (only those set)."""
        return {name: value for name, value in self.defaults.items() if value is not None}

    def check_token(self) -> None:
        """A remote API without a token is a configuration error, never an emulator fallback."""
        if not self.api_token and not is_loopback(self.base_url):
            raise SettingsError(
                f"RUNCOMFY_API_TOKEN is required for {self.base_url} "
                "(set it, or point RUNCOMFY_BASE_URL at a local emulator)"
            )

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self.check_token()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="runcomfy-client", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        self._client = self._submit(self.create_client()).result()

    async def create_client(self) -> AsyncRunComfyClient:
        """A new client with these settings, on the running event loop; the caller closes it.

        Outside a step (the command line), a token given as an `EnvVar` is read here.
        """
        token = self.api_token.get_value() if isinstance(self.api_token, EnvVar) else self.api_token
        return AsyncRunComfyClient(
            token or None,
            self.base_url,
            account_base_url=self.account_base_url,
            model_path=self.model_path,
            timeout=self.request_timeout,
            job_deadline=self.job_deadline,
            max_concurrency=self.max_concurrency,
            retry=RetryPolicy(max_attempts=self.http_attempts),
            poll=self.poll_schedule(),
        )

    def poll_schedule(self) -> PollSchedule:
        """The poll schedule: the fields set, the rest from the API host's default."""
        default = PollSchedule.for_base_url(self.base_url)
        return PollSchedule(
            self.poll_min_interval or default.min_interval,
            self.poll_max_interval or default.max_interval,
            default.fraction if self.poll_fraction is None else self.poll_fraction,
        )

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        loop, thread, client = self._loop, self._thread, self._client
        if loop is None or thread is None:
            return
        if client is not None:
            self._submit(client.aclose()).result(timeout=CLEANUP_SECONDS)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=CLEANUP_SECONDS)
        loop.close()
        self._loop = self._thread = self._client = None

    @property
    def client(self) -> AsyncRunComfyClient:
        """The live client; use it only inside coroutines passed to `run`."""
        if self._client is None:
            raise RuntimeError("RunComfyResource is not set up (use it inside a Dagster step)")
        return self._client

    async def result_elsewhere(self, request_id: str) -> EditResult:
        """`client.result(request_id)` awaited from a coroutine on another event loop.

        The client belongs to this resource's loop; a step that runs its own loop (the
        images step's downloads) asks through this.

        Example::

            result = await runcomfy.result_elsewhere("c1a2...")
            result.output_urls
        """
        return await asyncio.wrap_future(self._submit(self.client.result(request_id)))

    def run(
        self,
        coroutine: Coroutine[Any, Any, T],
        *,
        on_tick: Callable[[], None] | None = None,
        tick_seconds: float = 10.0,
        wake: threading.Event | None = None,
    ) -> T:
        """Run `coroutine` on the client's loop and wait for it.

        `on_tick` is called every `tick_seconds` on the calling thread (the step's),
        which is where Dagster logging belongs, and also as soon as `wake` is set (the
        coroutine sets it when it has something to report; it is cleared before the call).
        If the waiting thread is interrupted (Dagster stopping the run), the coroutine is
        cancelled and given `CLEANUP_SECONDS` to cancel its jobs.
        """
        finished = threading.Event()
        attention = wake if wake is not None else threading.Event()

        async def guarded() -> T:
            try:
                return await coroutine
            finally:
                finished.set()
                attention.set()

        future = self._submit(guarded())
        try:
            while True:
                attention.wait(tick_seconds)
                if finished.is_set():
                    break
                attention.clear()
                if on_tick is not None:
                    on_tick()
            return future.result()
        except (KeyboardInterrupt, DagsterExecutionInterruptedError) as interrupt:
            self._cancel_and_wait(future, finished)
            raise RunInterrupted("the run was stopped") from interrupt
        except BaseException:
            self._cancel_and_wait(future, finished)
            raise

    @staticmethod
    def _cancel_and_wait(future: Future[Any], finished: threading.Event) -> None:
        if not future.done():
            # Cancelling the future cancels the task on the loop; wait for its cleanup
            # (remote cancels, ledger writes), since the future itself returns at once.
            future.cancel()
            finished.wait(CLEANUP_SECONDS)

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("RunComfyResource is not set up (use it inside a Dagster step)")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)
