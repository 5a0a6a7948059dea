"""Take the secrets out of URLs before they reach an error, a log line or a stored row.

A pre-signed URL carries its credentials in the query string: AWS SigV4
(`X-Amz-Credential`, `X-Amz-Signature`, `X-Amz-Security-Token`), AWS SigV2
(`AWSAccessKeyId`, `Signature`), GCS (`X-Goog-*`, `GoogleAccessId`) and Azure SAS
(`sig`). `redact_text` replaces the values of those parameters (and a password in a URL's
user-info) with `REDACTED` wherever they appear (a URL, an exception message, a log line)
and keeps everything else, so the bucket, key, expiry and date stay readable.

Example::

    >>> redact_text("https://b.s3.amazonaws.com/cat.png?X-Amz-Expires=3600&X-Amz-Signature=abc")
    'https://b.s3.amazonaws.com/cat.png?X-Amz-Expires=3600&X-Amz-Signature=REDACTED'
    >>> redact_text("HTTP 403 from https://h/a.png?sig=xyz&se=2030")
    'HTTP 403 from https://h/a.png?sig=REDACTED&se=2030'
"""

from __future__ import annotations

import re

REDACTED = "REDACTED"
"""What a secret value is replaced with."""

SECRET_QUERY_PARAMETERS = frozenset(
    {
        # AWS Signature Version 4 (query-string authentication)
        "x-amz-credential",
        "x-amz-signature",
        "x-amz-security-token",
        # AWS Signature Version 2
        "awsaccesskeyid",
        "signature",
        "x-amz-signature-v2",
        # Google Cloud Storage V4 and V2 signing
        "x-goog-credential",
        "x-goog-signature",
        "x-goog-security-token",
        "googleaccessid",
        # Azure shared access signatures
        "sig",
        # Generic bearer-style parameters
        "token",
        "access_token",
        "api_key",
        "apikey",
        "key",
        "password",
        "secret",
    }
)
"""Query parameters whose value is a credential (matched case-insensitively)."""

_PARAMETER = re.compile(
    r"(?P<lead>[?&;]|&amp;|\b)(?P<name>[A-Za-z][A-Za-z0-9_.-]*)=(?P<value>[^&;#\s'\"<>)\]]*)"
)
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/?#@\s'\"<>]*):[^@/?#\s'\"<>]*@"
)


def is_secret_parameter(name: str) -> bool:
    """True when a query parameter named `name` carries a credential.

    >>> is_secret_parameter("X-Amz-Signature"), is_secret_parameter("X-Amz-Expires")
    (True, False)
    """
    lowered = name.lower()
    if lowered in SECRET_QUERY_PARAMETERS:
        return True
    if lowered.startswith("x-goog-"):
        return any(part in lowered for part in ("credential", "signature", "token"))
    return lowered.startswith("x-amz-") and any(
        part in lowered for part in ("credential", "signature", "token")
    )


def _hide_parameter(match: re.Match[str]) -> str:
    if not is_secret_parameter(match["name"]) or not match["value"]:
        return match[0]
    return f"{match['lead']}{match['name']}={REDACTED}"


def _hide_password(match: re.Match[str]) -> str:
    return f"{match['scheme']}{match['user']}:{REDACTED}@"


def redact_text(text: str) -> str:
    """`text` with every credential-bearing URL parameter and URL password replaced.

    >>> redact_text("s3 said: AWSAccessKeyId=AKIA123&Expires=99&Signature=x%2Fy")
    's3 said: AWSAccessKeyId=REDACTED&Expires=99&Signature=REDACTED'
    >>> redact_text("https://user:pw@host/a.png?X-Goog-Signature=00ff&alt=media")
    'https://user:REDACTED@host/a.png?X-Goog-Signature=REDACTED&alt=media'
    """
    if "=" not in text and "@" not in text:
        return text
    return _USERINFO.sub(_hide_password, _PARAMETER.sub(_hide_parameter, text))
