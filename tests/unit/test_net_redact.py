"""Signed-URL redaction: secrets go, the rest of the URL stays readable."""

from __future__ import annotations

import pytest

from flux2_pipeline.net import REDACTED, redact_text

SIGV4 = (
    "https://bucket.s3.us-east-1.amazonaws.com/refs/cat%20one.png"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600"
    "&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEXAMPLETOKEN"
    "&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=0123456789abcdef0123456789abcdef"
)
SECRETS = (
    "AKIAIOSFODNN7EXAMPLE",
    "IQoJb3JpZ2luX2VjEXAMPLETOKEN",
    "0123456789abcdef0123456789abcdef",
)


def test_sigv4_keeps_bucket_key_expiry_and_drops_every_secret() -> None:
    shown = redact_text(SIGV4)
    assert not any(secret in shown for secret in SECRETS)
    assert shown == (
        "https://bucket.s3.us-east-1.amazonaws.com/refs/cat%20one.png"
        "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=REDACTED"
        "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token=REDACTED"
        "&X-Amz-SignedHeaders=host&X-Amz-Signature=REDACTED"
    )


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        (
            "https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIAXXSECRET&Expires=1&Signature=c2ln",
            "AKIAXXSECRET",
        ),
        (
            "https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIA&Expires=1&Signature=c2lnSECRET",
            "c2lnSECRET",
        ),
        (
            "https://storage.googleapis.com/b/k?X-Goog-Algorithm=GOOG4&X-Goog-Credential=svc%40p.iam&X-Goog-Signature=f00dSECRET",
            "f00dSECRET",
        ),
        (
            "https://storage.googleapis.com/b/k?GoogleAccessId=svc@p.iam&Signature=abcSECRET",
            "abcSECRET",
        ),
        (
            "https://acct.blob.core.windows.net/c/b.png?sv=2022-11-02&se=2030&sp=r&sig=AzSECRET%3D",
            "AzSECRET",
        ),
        ("https://user:hunter2SECRET@host.example/a.png", "hunter2SECRET"),
        ("https://h/a.png?x-amz-signature=lowerSECRET", "lowerSECRET"),
    ],
)
def test_each_signing_scheme_is_redacted(url: str, secret: str) -> None:
    shown = redact_text(url)
    assert secret not in shown
    assert REDACTED in shown
    assert shown.split("?")[0].split("@")[-1] == url.split("?")[0].split("@")[-1]


def test_text_with_several_urls_and_bare_parameters() -> None:
    text = (
        f"HTTP 403 Forbidden from {SIGV4}; retried 'https://x.test/a.png?sig=ZZZ&se=1'.\n"
        "boto said Signature=QQQ&AWSAccessKeyId=AKIAQQQ"
    )
    shown = redact_text(text)
    assert not any(secret in shown for secret in (*SECRETS, "ZZZ", "QQQ", "AKIAQQQ"))
    assert "HTTP 403 Forbidden from https://bucket.s3.us-east-1.amazonaws.com/refs/" in shown
    assert "se=1'." in shown and shown.count("\n") == 1


def test_text_without_secrets_is_unchanged() -> None:
    for text in ("plain words", "https://a.test/x.png?w=10&h=20", "a=b c=d", ""):
        assert redact_text(text) == text
