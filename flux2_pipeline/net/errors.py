"""Why an untrusted URL could not be fetched: one exception, one line, no secrets.

    FetchError                 (kind, url (redacted), reason, status)
      kind "invalid_url"       the URL cannot be parsed, has an unsupported scheme, a bad
                               port, control characters or embedded credentials
      kind "refused"           the host resolves only to addresses the policy refuses
      kind "too_large"         more bytes than the cap
      kind "unavailable"       an HTTP error status, too many redirects, or transient
                               failures (timeouts, 429, 5xx) that outlasted every retry

Example::

    try:
        fetched = await fetcher.fetch(url)
    except FetchError as exc:
        print(exc.kind, exc)   # "refused", "link-local address 169.254.169.254 for http://..."
"""

from __future__ import annotations

from typing import Literal

from flux2_pipeline.net.redact import redact_text

FetchErrorKind = Literal["invalid_url", "refused", "too_large", "unavailable"]


def one_line(text: str, limit: int = 500) -> str:
    """`text` redacted, on one line, at most `limit` characters."""
    flat = " ".join(redact_text(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def shown_url(url: object, limit: int = 200) -> str:
    """A URL as it may appear in a message: redacted, printable, shortened."""
    text = url if isinstance(url, str) else repr(url)
    printable = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
    return one_line(printable, limit)


class FetchError(Exception):
    """One URL could not be fetched; `str(exc)` is a one-line reason naming the URL.

    The URL and the reason are redacted (see `flux2_pipeline.net.redact`).
    """

    def __init__(
        self, kind: FetchErrorKind, url: object, reason: str, status: int | None = None
    ) -> None:
        self.kind: FetchErrorKind = kind
        self.url = shown_url(url)
        self.reason = one_line(reason)
        self.status = status
        super().__init__(self.reason)
