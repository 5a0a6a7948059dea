"""Property: whatever text a table holds as a URL, the fetcher answers with a FetchError
or a result, never another exception, and redaction never leaks a signature."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux2_pipeline.net import (
    AddressPolicy,
    FetchError,
    FetchLimits,
    GuardedFetcher,
    redact_text,
)

PIECES = st.sampled_from(
    ["http://", "https://", "ftp://", "s3://", "[", "]", "::1", "%", "@", ":", "99999", "/",
     "?", "#", "&", "=", "\x00", " ", "\n", "☃", "xn--", "127.0.0.1", "169.254.169.254",
     "a.test", "..", "\\", "user:pw@"]
)  # fmt: skip
URLS = st.one_of(st.text(max_size=60), st.lists(PIECES, max_size=8).map("".join))


async def _metadata(host: str, port: int) -> Sequence[str]:
    return ["169.254.169.254"]  # every name is refused before a connection is tried


def _not_found(request: httpx.Request) -> httpx.Response:
    return httpx.Response(404)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=URLS)
def test_any_text_is_a_result_or_a_fetch_error(url: str) -> None:
    async def attempt() -> None:
        async with GuardedFetcher(
            AddressPolicy(allow_loopback=True),
            FetchLimits(attempts=1, probe_attempts=1),
            resolver=_metadata,
            transport=httpx.MockTransport(_not_found),
        ) as guarded:
            try:
                await guarded.fetch(url)
            except FetchError as exc:
                assert "\n" not in str(exc) and "\x00" not in str(exc)
            result = await guarded.probe(url)
            assert not result.ok

    asyncio.run(attempt())


@given(
    prefix=st.text(max_size=20),
    secret=st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789%", min_size=12, max_size=40),
    name=st.sampled_from(["X-Amz-Signature", "x-amz-credential", "Signature", "sig", "X-Goog-Signature"]),
)  # fmt: skip
def test_redaction_never_leaks_the_secret(prefix: str, secret: str, name: str) -> None:
    url = f"https://h.test/{prefix}?a=1&{name}={secret}&b=2"
    assert secret not in redact_text(url).split("?", 1)[1]
