"""Untrusted URLs, fetched safely: one address policy, one fetcher, one redactor.

Dagster-free and below `batch`/`media`: it imports only the standard library, httpx and
`flux2_pipeline.runcomfy.retry`. Every fetch of a URL that came from a table or an API
answer goes through `GuardedFetcher` (see `flux2_pipeline.net.fetch`); every URL that
goes into an error, a log line or a stored row goes through `redact_text`.

Example::

    from flux2_pipeline.net import AddressPolicy, GuardedFetcher, redact_text

    async with GuardedFetcher(AddressPolicy.for_api(base_url)) as fetcher:
        result = await fetcher.probe(url)
        if not result.ok:
            row.error = result.reason          # already redacted, one line
    stored_url = redact_text(url)
"""

from flux2_pipeline.net.errors import FetchError, FetchErrorKind
from flux2_pipeline.net.fetch import (
    DEFAULT_MAX_BYTES,
    Fetched,
    FetchLimits,
    GuardedFetcher,
    ProbeResult,
    parse_url,
)
from flux2_pipeline.net.policy import AddressPolicy, AddressRefused, Resolver, system_resolver
from flux2_pipeline.net.redact import (
    REDACTED,
    SECRET_QUERY_PARAMETERS,
    is_secret_parameter,
    redact_text,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "REDACTED",
    "SECRET_QUERY_PARAMETERS",
    "AddressPolicy",
    "AddressRefused",
    "FetchError",
    "FetchErrorKind",
    "FetchLimits",
    "Fetched",
    "GuardedFetcher",
    "ProbeResult",
    "Resolver",
    "is_secret_parameter",
    "parse_url",
    "redact_text",
    "system_resolver",
]
