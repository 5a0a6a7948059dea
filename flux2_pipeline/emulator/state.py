"""The emulator's model of the service: configuration, faults, counters and the job queue.

`EmulatorState` owns every job. At most `max_concurrent` jobs are `in_progress`; the
rest wait FIFO. Each started job is one asyncio task that fetches its reference
images (cached by URL) and sleeps out the rest of `latency` (the value in force: lowering
it ends running jobs sooner too); nothing is rendered until an output URL is fetched::

    >>> state = EmulatorState(EmulatorConfig(max_concurrent=2, seed=1))
    >>> state.faults.update(fail_rate=0.5)
    >>> state.counters.snapshot()["jobs_created"]
    0
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import re
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from flux2_pipeline.emulator.dialect import (
    BALANCE_ROUTES,
    DIALECTS,
    DOCUMENTED,
    ERROR_SHAPES,
    MODEL_FAILED,
    MODEL_ROUTES,
)
from flux2_pipeline.emulator.references import (
    AsyncMemo,
    ReferenceFetchError,
    download_reference,
    new_http_client,
)
from flux2_pipeline.emulator.render import render_edit, render_sample
from flux2_pipeline.runcomfy.models import EditRequest, JobState

MAX_RETAINED_JOBS = 100_000
"""Beyond this many jobs the oldest finished ones are forgotten (their ids then 404)."""

LATENCY_RECHECK_SECONDS = 1.0
"""How often a running job looks again at `latency`, which may have changed."""

UNLIMITED_BALANCE_USD = 1000.0
"""What the balance route reports while `balance_usd` is None (no balance is kept)."""

MICRO = 1_000_000
"""Microdollars per dollar: the balance is kept in whole microdollars, so that 0.25 USD at
0.025 a job is exactly ten jobs."""

MODEL_ERROR = {
    "error_code": "MODEL_ERROR",
    "error_message": "the model failed on this input (emulated)",
}

_SAMPLE_PATH = re.compile(r"/samples/([a-z0-9_-]{1,64})\.png")
_OUTPUT_PATH = re.compile(r"/v1/outputs/([0-9a-f-]{36})/(\d{1,2})\.(?:png|jpeg|jpg|webp)")


@dataclass
class EmulatorConfig:
    """How an emulator starts; faults can be changed later through `Faults.update`.

    `token`, when set, is required on the API routes and on the `/_emulator/*` control
    routes. Limits: request bodies over `max_body_bytes` get 413; a submit while
    `max_queue` jobs wait gets 429 with Retry-After (no job is created); at most
    `max_tracked_bodies` request-body hashes are counted (the oldest are forgotten).
    `keep_alive` is how long the server keeps an idle connection open (uvicorn's 5 s).

    `dialect` and the settings after it are described on `Faults`, except the account:
    `balance_usd` None keeps no balance (the balance route reports
    `UNLIMITED_BALANCE_USD`); a number is the account's balance, which each completed
    job's cost lowers and which refuses a submit it cannot cover (400002).

    Example::

        >>> EmulatorConfig(port=0, latency=0.2, fault_429=0.1, retry_after="0.05", seed=7)
        EmulatorConfig(host='127.0.0.1', port=0, latency=0.2, ...)
    """

    host: str = "127.0.0.1"
    port: int = 8188
    latency: float = 0.0
    max_concurrent: int = 8
    fault_429: float = 0.0
    fault_5xx: float = 0.0
    fail_rate: float = 0.0
    token: str | None = field(default=None, repr=False)
    fault_5xx_on_submit: bool = True
    retry_after: str = "1"
    submit_delay: float = 0.0
    seed: int | None = None
    drop_submits: int = 0
    max_body_bytes: int = 1024 * 1024
    max_queue: int = 10_000
    max_tracked_bodies: int = 100_000
    keep_alive: float = 5.0
    dialect: str = DOCUMENTED
    fault_200_error: float = 0.0
    result_lag: float = 0.0
    succeeded_rate: float = 0.0
    extra_states: bool = False
    error_shape: str = "string"
    price_usd: float = 0.025
    model_route: str = "ok"
    balance_usd: float | None = None
    balance_route: str = "ok"
    balance_error_http_200: bool = False


@dataclass
class Faults:
    """Fault settings, changeable at runtime; `seed` makes the random draws repeatable.

    Example::

        >>> faults = Faults(seed=3)
        >>> faults.update(fault_5xx=0.2, drop_submits=2, retry_after=0.05)
        >>> faults.retry_after
        '0.05'
    """

    fault_429: float = 0.0
    fault_5xx: float = 0.0
    fail_rate: float = 0.0
    retry_after: str = "1"
    submit_delay: float = 0.0
    drop_submits: int = 0
    fail_next: int = 0
    seed: int | None = None
    fault_5xx_on_submit: bool = True
    """False keeps `fault_5xx` to status, result and cancel: a client must treat a 5xx on a
    submit as an unknown outcome, so a run that should complete despite 5xx disables it."""
    hold_submits: bool = False
    """While true, a submit creates its job and then withholds the answer until it is set
    back to false: however long a client's timeout is, the timeout ends the call."""
    hold_jobs: bool = False
    """While true, running jobs do not finish (their latency still runs out); the queue,
    positions and cancels hold still for as long as a test needs to look at them."""
    dialect: str = DOCUMENTED
    """"documented" (RunComfy's: numeric codes, `succeeded`, `canceled`, 202 submits,
    400005 for a result not ready, `cost`) or "seed" (string codes, `completed`,
    `cancelled`, 200 submits, an unfinished job's result answers its state, `cost_usd`)."""
    fault_200_error: float = 0.0
    """Probability that a status or result poll answers HTTP 200 with an error body
    (500001) instead of the job; nothing changes."""
    result_lag: float = 0.0
    """Seconds after a job ended during which `/result` still answers 400005 although
    `/status` already says it ended (documented dialect)."""
    succeeded_rate: float = 0.0
    """Probability, drawn once per completed job, that `/status` says `succeeded` rather
    than `completed` (`/result` always says `succeeded` in the documented dialect)."""
    extra_states: bool = False
    """While true, about half the status answers say `pending`/`waiting` for a queued job
    and `starting`/`processing` for a running one (documented dialect)."""
    error_shape: str = "string"
    """A failed job's `error` in the documented dialect: "string", "object" or "list"."""
    price_usd: float = 0.025
    """Price per output image: the model route's `base_price_usd`, the `cost` of a
    completed job, what a submit reserves from the balance."""
    model_route: str = "ok"
    """`GET` on the model's route: "ok", "missing" (404) or "error" (500)."""
    balance_route: str = "ok"
    """`GET /prod/v2/balance`: "ok", "missing" (404), "error" (500) or "denied" (HTTP 200
    with error 403003, as RunComfy's clients have seen)."""
    balance_error_http_200: bool = False
    """True: a submit the balance cannot cover is refused with HTTP 200 and the 400002
    body instead of HTTP 400."""
    expire_outputs: tuple[str, ...] = ()
    """Request ids whose output URLs answer 410, as RunComfy's do once an output expires."""
    refresh_outputs: bool = False
    """While true, `/result` of a job in `expire_outputs` gives fresh output URLs that work
    (`?fresh=1`); while false it gives the expired ones again."""
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.update(**{f.name: getattr(self, f.name) for f in fields(self) if f.init})

    def update(self, **changes: Any) -> None:
        """Validate and apply changes; a `seed` change restarts the random sequence."""
        clean: dict[str, Any] = {}
        for name, value in changes.items():
            if name in (
                "fault_429",
                "fault_5xx",
                "fail_rate",
                "fault_200_error",
                "succeeded_rate",
            ):
                clean[name] = _number(name, value, 0.0, 1.0)
            elif name in ("submit_delay", "result_lag"):
                clean[name] = _number(name, value, 0.0, 3600.0)
            elif name == "price_usd":
                clean[name] = _number(name, value, 0.0, 1000.0)
            elif name in _CHOICES:
                if value not in _CHOICES[name]:
                    raise ValueError(f"{name} must be one of {', '.join(_CHOICES[name])}")
                clean[name] = value
            elif name == "retry_after":
                _number(name, value, 0.0, 86400.0)
                clean[name] = str(value)
            elif name in ("drop_submits", "fail_next"):
                clean[name] = int(_number(name, value, 0, 1_000_000, integer=True))
            elif name == "expire_outputs":
                clean[name] = _request_ids(name, value)
            elif name in (
                "fault_5xx_on_submit",
                "hold_submits",
                "hold_jobs",
                "extra_states",
                "balance_error_http_200",
                "refresh_outputs",
            ):
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false, got {value!r}")
                clean[name] = value
            elif name == "seed":
                clean[name] = (
                    None if value is None else int(_number(name, value, 0, 2**63, integer=True))
                )
            else:
                raise ValueError(f"unknown fault setting {name!r}")
        for name, value in clean.items():
            setattr(self, name, value)
        if "seed" in clean or not hasattr(self, "_rng"):
            self._rng = random.Random(self.seed)

    def roll(self, probability: float) -> bool:
        """True with `probability`; draws nothing when it is 0, so unrelated faults stay put."""
        return probability > 0 and self._rng.random() < probability

    def choice(self, options: Sequence[int]) -> int:
        """One of `options`, drawn from the fault RNG."""
        return options[self._rng.randrange(len(options))]

    @property
    def documented(self) -> bool:
        """True in RunComfy's documented dialect."""
        return self.dialect == DOCUMENTED

    def take_failure(self) -> bool:
        """True if this finishing job must fail: a pending `fail_next`, else `fail_rate`."""
        if self.fail_next > 0:
            self.fail_next -= 1
            return True
        return self.roll(self.fail_rate)

    def take_drop(self) -> bool:
        """Consume one pending `drop_submits`; True if this submit must be dropped."""
        if self.drop_submits <= 0:
            return False
        self.drop_submits -= 1
        return True

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


_CHOICES: dict[str, tuple[str, ...]] = {
    "dialect": DIALECTS,
    "error_shape": ERROR_SHAPES,
    "model_route": MODEL_ROUTES,
    "balance_route": BALANCE_ROUTES,
}


async def _while(condition: Callable[[], bool]) -> None:
    # Polled, not an asyncio.Event: faults are changed from other threads (tests, the
    # control route), and a flag read is safe across threads where an Event is not.
    while condition():
        await asyncio.sleep(0.01)


def _microdollars(usd: Any) -> int | None:
    if usd is None:
        return None
    return round(_number("balance_usd", usd, -1e9, 1e9) * MICRO)


def _request_ids(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
        raise ValueError(f"{name} must be a list of request ids, got {value!r}")
    if not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name} must hold request ids (strings), got {value!r}")
    return tuple(value)


def _number(name: str, value: Any, low: float, high: float, integer: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or not low <= number <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")
    if integer and number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return number


@dataclass
class Counters:
    """What the emulator has seen; read in-process or at `GET /_emulator/stats`.

    Example::

        >>> counters = Counters()
        >>> counters.body_submissions.update({"ab12": 2, "cd34": 1})
        >>> counters.duplicate_bodies
        1
    """

    submits_total: int = 0
    jobs_created: int = 0
    status_calls: int = 0
    result_calls: int = 0
    cancel_calls: int = 0
    cancelled_jobs: int = 0
    failed_jobs: int = 0
    completed_jobs: int = 0
    rejected_429: int = 0
    rejected_5xx: int = 0
    rejected_401: int = 0
    rejected_422: int = 0
    dropped_submits: int = 0
    rejected_413: int = 0
    rejected_queue_full: int = 0
    rejected_control_401: int = 0
    rejected_400001: int = 0
    rejected_400002: int = 0
    errors_200: int = 0
    results_not_ready: int = 0
    model_calls: int = 0
    balance_calls: int = 0
    charged_microdollars: int = 0
    forgotten_bodies: int = 0
    image_fetches: int = 0
    in_progress_now: int = 0
    held_submits_now: int = 0
    max_in_progress: int = 0
    max_queue_length: int = 0
    body_submissions: dict[str, int] = field(default_factory=dict)

    @property
    def duplicate_bodies(self) -> int:
        """How many distinct request bodies created more than one job."""
        return sum(1 for count in self.body_submissions.values() if count > 1)

    def bump(self, name: str) -> None:
        """Add one to the counter `name`."""
        setattr(self, name, getattr(self, name) + 1)

    def reset(self, queued: int = 0) -> None:
        """Zero every counter but the live gauges (`*_now`); peaks restart from now."""
        for f in fields(self):
            if f.name != "body_submissions" and not f.name.endswith("_now"):
                setattr(self, f.name, 0)
        self.body_submissions = {}
        self.max_in_progress = self.in_progress_now
        self.max_queue_length = queued

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy, including `duplicate_bodies`."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["body_submissions"] = dict(self.body_submissions)
        data["duplicate_bodies"] = self.duplicate_bodies
        return data


@dataclass(eq=False)
class Job:
    """One emulated job; `references` holds the fetched reference bytes once started.

    `error` is the failure in the seed dialect's shape; `failure` in RunComfy's words."""

    request_id: str
    request: EditRequest
    state: JobState
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: dict[str, str] | None = None
    references: tuple[bytes, ...] = ()
    cost_micro: int = 0
    """What the job costs (price x images, in microdollars), reserved at submit."""
    says_succeeded: bool = False
    """`/status` spells this completed job `succeeded` (documented dialect)."""
    failure: str | None = None
    """The failure in RunComfy's words, for the documented dialect's `error`."""


class EmulatorState:
    """Jobs, queue, faults and counters of one emulator; `app.state.emulator`.

    Example::

        >>> state = server.state
        >>> state.faults.update(drop_submits=1)
        >>> state.counters.jobs_created, state.queue_length
        (3, 0)
    """

    def __init__(self, config: EmulatorConfig) -> None:
        if config.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        for name in ("max_body_bytes", "max_queue", "max_tracked_bodies"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not (math.isfinite(config.latency) and config.latency >= 0):
            raise ValueError("latency must be a non-negative number of seconds")
        self.config = config
        self.latency = float(config.latency)
        self.max_concurrent = int(config.max_concurrent)
        self.faults = Faults(
            fault_429=config.fault_429,
            fault_5xx=config.fault_5xx,
            fail_rate=config.fail_rate,
            retry_after=config.retry_after,
            submit_delay=config.submit_delay,
            drop_submits=config.drop_submits,
            seed=config.seed,
            fault_5xx_on_submit=config.fault_5xx_on_submit,
            dialect=config.dialect,
            fault_200_error=config.fault_200_error,
            result_lag=config.result_lag,
            succeeded_rate=config.succeeded_rate,
            extra_states=config.extra_states,
            error_shape=config.error_shape,
            price_usd=config.price_usd,
            model_route=config.model_route,
            balance_route=config.balance_route,
            balance_error_http_200=config.balance_error_http_200,
        )
        self.balance_micro: int | None = _microdollars(config.balance_usd)
        self.reserved_micro = 0
        self.counters = Counters()
        self.jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_hosts: set[str] = set()
        self._client: httpx.AsyncClient | None = None
        self._references: AsyncMemo[str] = AsyncMemo(256 * 1024 * 1024, 4096)
        self._renders: AsyncMemo[tuple[str, int]] = AsyncMemo(128 * 1024 * 1024, 512)
        self._samples: AsyncMemo[str] = AsyncMemo(32 * 1024 * 1024, 1024)

    @property
    def in_progress(self) -> int:
        """Jobs running right now."""
        return self.counters.in_progress_now

    @property
    def queue_length(self) -> int:
        """Jobs waiting for a slot."""
        return len(self._queue)

    def note_host(self, netloc: str) -> None:
        """Remember a host:port clients use for us, so our own sample URLs skip HTTP."""
        if len(self._own_hosts) < 64:
            self._own_hosts.add(netloc.lower())

    @property
    def queue_full(self) -> bool:
        """True while `max_queue` jobs wait: a submit now is refused with 429."""
        return len(self._queue) >= self.config.max_queue

    @property
    def balance_usd(self) -> float | None:
        """The account's balance (completed jobs' costs taken off); None: not kept."""
        return None if self.balance_micro is None else self.balance_micro / MICRO

    def can_afford(self, cost_micro: int) -> bool:
        """True if the balance, less what queued and running jobs reserve, covers a job."""
        if self.balance_micro is None:
            return True
        return self.balance_micro - self.reserved_micro >= cost_micro

    def submit(self, request: EditRequest, body_hash: str, cost_micro: int = 0) -> Job:
        """Create a queued job, reserving its cost, and start it if a slot is free."""
        job = Job(
            str(uuid.uuid4()),
            request,
            JobState.IN_QUEUE,
            datetime.now(UTC),
            cost_micro=cost_micro,
        )
        self.reserved_micro += cost_micro
        self.jobs[job.request_id] = job
        counters = self.counters
        counters.jobs_created += 1
        bodies = counters.body_submissions
        if body_hash not in bodies and len(bodies) >= self.config.max_tracked_bodies:
            del bodies[next(iter(bodies))]  # bounded memory: forget the oldest body seen
            counters.forgotten_bodies += 1
        bodies[body_hash] = bodies.get(body_hash, 0) + 1
        self._queue.append(job)
        self.pump()
        if len(self.jobs) > MAX_RETAINED_JOBS:
            self._forget_finished_jobs()
        counters.max_queue_length = max(counters.max_queue_length, len(self._queue))
        return job

    def queue_position(self, job: Job) -> int | None:
        """0-based place in the queue of a waiting job, else None."""
        if job.state is not JobState.IN_QUEUE:
            return None
        return self._queue.index(job)

    def cancel(self, job: Job) -> bool:
        """Cancel a queued job; True if the job is (now) cancelled."""
        if job.state is JobState.IN_QUEUE:
            self._queue.remove(job)
            self._finish(job, JobState.CANCELLED, None)
            self.counters.cancelled_jobs += 1
        return job.state is JobState.CANCELLED

    def pump(self) -> None:
        """Start queued jobs while slots are free."""
        counters = self.counters
        if self._queue:
            self._loop = asyncio.get_running_loop()
        while self._queue and counters.in_progress_now < self.max_concurrent:
            job = self._queue.popleft()
            job.state = JobState.IN_PROGRESS
            job.started_at = datetime.now(UTC)
            counters.in_progress_now += 1
            counters.max_in_progress = max(counters.max_in_progress, counters.in_progress_now)
            task = asyncio.get_running_loop().create_task(self._run(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _pump_soon(self) -> None:
        # Settings also change from other threads (tests, the CLI's caller): a job can only
        # start on the server's loop.
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.pump)
            return
        self.pump()

    async def hold_answer(self) -> None:
        """Wait while `faults.hold_submits` is set, counted in `held_submits_now`.

        Example (a test, while a submit is held)::

            >>> state.counters.held_submits_now, state.counters.jobs_created
            (1, 1)
            >>> state.faults.update(hold_submits=False)  # the answer goes out
        """
        if not self.faults.hold_submits:
            return
        self.counters.held_submits_now += 1
        try:
            await _while(lambda: self.faults.hold_submits)
        finally:
            self.counters.held_submits_now -= 1

    def reset_counters(self) -> None:
        """Zero the counters (`POST /_emulator/reset`); live gauges keep their values."""
        self.counters.reset(queued=len(self._queue))

    def update_settings(self, changes: Mapping[str, Any]) -> None:
        """Apply fault settings plus `latency` and `max_concurrent` (runtime endpoint)."""
        changes = dict(changes)
        latency = changes.pop("latency", None)
        concurrency = changes.pop("max_concurrent", None)
        has_balance = "balance_usd" in changes
        balance = _microdollars(changes.pop("balance_usd", None))
        if latency is not None and not (
            isinstance(latency, int | float) and math.isfinite(latency) and latency >= 0
        ):
            raise ValueError(f"latency must be a non-negative number, got {latency!r}")
        if concurrency is not None and not (isinstance(concurrency, int) and concurrency >= 1):
            raise ValueError(f"max_concurrent must be an integer >= 1, got {concurrency!r}")
        self.faults.update(**changes)
        if has_balance:
            self.balance_micro = balance
        if latency is not None:
            self.latency = float(latency)
        if concurrency is not None:
            self.max_concurrent = concurrency
            self._pump_soon()

    def settings(self) -> dict[str, Any]:
        """Faults plus `latency`, `max_concurrent` and the balance, JSON-ready."""
        return {
            **self.faults.to_dict(),
            "latency": self.latency,
            "max_concurrent": self.max_concurrent,
            "balance_usd": self.balance_usd,
            "reserved_usd": self.reserved_micro / MICRO,
        }

    def stats(self) -> dict[str, Any]:
        """Counters plus live gauges and the current settings, JSON-ready."""
        return {
            **self.counters.snapshot(),
            "queue_length_now": len(self._queue),
            "jobs_total": len(self.jobs),
            "settings": self.settings(),
        }

    async def sample(self, name: str) -> bytes:
        """The PNG served at `/samples/{name}.png`, rendered once and cached."""
        return await self._samples.get(name, lambda: asyncio.to_thread(render_sample, name))

    async def output_image(self, job: Job, index: int) -> bytes:
        """Output image `index` of a completed job, rendered on first request."""
        params = job.request

        def render() -> bytes:
            return render_edit(
                job.references,
                params.prompt,
                seed=params.seed,
                image_size=params.image_size,
                output_format=params.output_format,
                index=index,
                guidance_scale=params.guidance_scale,
                num_inference_steps=params.num_inference_steps,
                enable_prompt_expansion=params.enable_prompt_expansion,
            )

        return await self._renders.get((job.request_id, index), lambda: asyncio.to_thread(render))

    async def aclose(self) -> None:
        """Stop running jobs and close the HTTP client (app shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            error: dict[str, str] | None = None
            try:
                job.references = await self._fetch_all(job.request.image_urls)
            except ReferenceFetchError as exc:
                error = {"error_code": "IMAGE_FETCH_FAILED", "error_message": str(exc)}
                job.failure = f"failed to load image from {exc.url}: {exc.reason}"
            # The latency in force decides, so a lowered latency also ends running jobs
            # sooner (a test can hold jobs running, then let them finish). Settings may
            # change from another thread, hence a bounded wait instead of an event.
            while (remaining := started + self.latency - loop.time()) > 0:
                await asyncio.sleep(min(remaining, LATENCY_RECHECK_SECONDS))
            await _while(lambda: self.faults.hold_jobs)
            if error is None and self.faults.take_failure():
                error = dict(MODEL_ERROR)
                job.failure = MODEL_FAILED
        except Exception as exc:  # a bug here must fail the job, never strand it
            error = {"error_code": "INTERNAL_ERROR", "error_message": f"emulator error: {exc!r}"}
            job.failure = error["error_message"]
        finally:
            self.counters.in_progress_now -= 1
        if error is None:
            job.says_succeeded = self.faults.roll(self.faults.succeeded_rate)
            self._finish(job, JobState.COMPLETED, None)
            self.counters.completed_jobs += 1
        else:
            self._finish(job, JobState.FAILED, error)
            self.counters.failed_jobs += 1
        self.pump()

    def _forget_finished_jobs(self) -> None:
        # Drop a tenth at a time so the scan is amortised over many submits.
        oldest = list(itertools.islice(self.jobs, MAX_RETAINED_JOBS // 10))
        for request_id in oldest:
            if self.jobs[request_id].state.is_terminal:
                del self.jobs[request_id]

    def _finish(self, job: Job, state: JobState, error: dict[str, str] | None) -> None:
        job.state = state
        job.error = error
        job.finished_at = datetime.now(UTC)
        # Only a completed job is charged; a failed or cancelled one gives its reservation back.
        self.reserved_micro -= job.cost_micro
        if state is JobState.COMPLETED:
            self.counters.charged_microdollars += job.cost_micro
            if self.balance_micro is not None:
                self.balance_micro -= job.cost_micro

    async def _fetch_all(self, urls: Sequence[str]) -> tuple[bytes, ...]:
        results = await asyncio.gather(
            *(self._reference(url) for url in urls), return_exceptions=True
        )
        for outcome in results:  # the first failing URL in order, for a stable message
            if isinstance(outcome, BaseException):
                raise outcome
        return tuple(r for r in results if isinstance(r, bytes))

    async def _reference(self, url: str) -> bytes:
        parts = urlsplit(url)
        if parts.netloc.lower() in self._own_hosts:
            sample = _SAMPLE_PATH.fullmatch(parts.path)
            if sample:
                return await self.sample(sample.group(1))
            output = _OUTPUT_PATH.fullmatch(parts.path)
            job = self.jobs.get(output.group(1)) if output else None
            if output and job and job.state is JobState.COMPLETED:
                index = int(output.group(2))
                if index < job.request.num_images:
                    return await self.output_image(job, index)
        return await self._references.get(url, lambda: download_reference(self._http(), url))

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = new_http_client()
        return self._client
