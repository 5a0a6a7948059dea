"""Never pay for what cannot succeed: check reference images before a row is submitted.

`ReferenceCheck` asks a probe (the guarded fetcher's cheap reachability check) about each
distinct URL once per run, shares the answer between rows that reference the same image,
and keeps a bounded number of answers so a run of any size stays in constant memory.

Example::

    check = ReferenceCheck(fetcher.probe)
    problem = await check.check(request.image_urls)
    if problem is not None:
        ...  # end the row `failed` with `problem`; nothing is paid
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from flux2_pipeline.net import redact_text

MAX_REMEMBERED_URLS = 100_000
"""Answers kept per run; the oldest are forgotten (and asked again) past this."""


class ProbeAnswer(Protocol):
    """What a probe says about one URL: `ok`, and a one-line `reason` naming it when not."""

    @property
    def ok(self) -> bool: ...

    @property
    def reason(self) -> str | None: ...


Probe = Callable[[str], Awaitable[ProbeAnswer]]


class ReferenceCheck:
    """Checks that every reference image of a row can be fetched, once per distinct URL."""

    def __init__(self, probe: Probe, *, max_remembered: int = MAX_REMEMBERED_URLS) -> None:
        self._probe = probe
        self._max = max_remembered
        self._answers: OrderedDict[str, asyncio.Future[str | None]] = OrderedDict()
        self.probes = 0
        """How many URLs were actually probed (the rest were answered from memory)."""

    async def check(self, urls: Sequence[str]) -> str | None:
        """None when every URL can be fetched, else why the first one cannot."""
        for url in urls:
            problem = await self._answer(url)
            if problem is not None:
                return problem
        return None

    async def _answer(self, url: str) -> str | None:
        known = self._answers.get(url)
        if known is not None:
            self._answers.move_to_end(url)
            if known.done() and not known.cancelled():
                return known.result()  # asked and answered before: most rows
            return await asyncio.shield(known)
        known = asyncio.get_running_loop().create_future()
        self._answers[url] = known
        if len(self._answers) > self._max:
            self._answers.popitem(last=False)
        self.probes += 1
        try:
            answer = await self._probe(url)
            problem = None if answer.ok else _reason(url, answer.reason)
        except Exception as exc:  # a probe that breaks must not sink the row or the run
            problem = _reason(url, f"the check failed: {type(exc).__name__}")
        except BaseException:
            self._answers.pop(url, None)
            known.cancel()
            raise
        known.set_result(problem)
        return problem


def _reason(url: str, reason: str | None) -> str:
    # A pre-signed URL's signature must never reach a results row, a log or the ledger.
    shown = redact_text(url)
    text = redact_text(reason or "it cannot be fetched")
    if shown not in text:
        text = f"{shown}: {text}"
    return f"reference image cannot be fetched: {text}"
