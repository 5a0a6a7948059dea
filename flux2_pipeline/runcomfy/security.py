"""Transport-security rules for the API's base URL, as pure functions.

A bearer token sent over plain http to a remote host can be read by anyone on the path.
Plain http is fine on loopback (the emulator); anywhere else a token requires https.
Configuration code can call `require_secure_base_url` to refuse a setting early; the
client calls it in its constructor.

Example::

    >>> require_secure_base_url("http://127.0.0.1:8188", has_token=True)
    >>> require_secure_base_url("https://api.runcomfy.net", has_token=True)
    >>> require_secure_base_url("http://api.example.com", has_token=True)
    Traceback (most recent call last):
    ...
    flux2_pipeline.runcomfy.security.InsecureBaseUrl: base URL http://api.example.com would send \
the API token in clear: use https:// for a remote API (plain http:// only on loopback)
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost"})


class InsecureBaseUrl(ValueError):
    """The API base URL would expose the token (plain http to a non-loopback host)."""


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and any loopback IP (127.0.0.0/8, ::1).

    >>> is_loopback_host("127.0.0.2"), is_loopback_host("::1"), is_loopback_host("example.com")
    (True, True, False)
    """
    name = host.strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def require_secure_base_url(base_url: str, has_token: bool) -> None:
    """Raise `InsecureBaseUrl` when a token would go over http to a non-loopback host."""
    if not has_token:
        return
    try:
        parts = urlsplit(base_url.strip())
        host = parts.hostname or ""
    except ValueError:
        return  # not a URL at all: the HTTP client reports that with its own error
    if parts.scheme.lower() == "http" and not is_loopback_host(host):
        shown = f"{parts.scheme}://{host}"
        raise InsecureBaseUrl(
            f"base URL {shown} would send the API token in clear: use https:// for a remote "
            "API (plain http:// only on loopback)"
        )
