"""Why an image could not be stored: one exception tree, drawn once.

    ImageFetchError            (url (redacted), reason; every failure of one image)
    ├── InvalidImageUrl        the URL is malformed or its scheme is not http(s)/s3
    ├── ImageRefused           the host resolves to an address the policy refuses
    ├── ImageUnavailable       HTTP error status (404/410: expired URL), a missing
    │                          object, or transient errors that outlasted every retry
    ├── NotAnImage             the response's content type is not image/*
    ├── ImageTooLarge          more bytes than the size cap (an image with more pixels
    │                          than the decode ceiling is stored, not refused)
    └── CorruptImage           no header Pillow can read, or a broken structure

Reasons and URLs are redacted (no signed-URL secrets) and fit on one line.

Example::

    try:
        fetched = await fetcher.fetch(url)
    except ImageFetchError as exc:
        print(exc.kind, exc)   # "unavailable", "HTTP 404 Not Found from https://..."
"""

from __future__ import annotations

from flux2_pipeline.net import redact_text


class ImageFetchError(Exception):
    """One image could not be fetched, verified or stored; `kind` names the family."""

    kind = "error"

    def __init__(self, url: object, reason: str, status: int | None = None) -> None:
        self.url = redact_text(url) if isinstance(url, str) else repr(url)
        self.reason = " ".join(redact_text(reason).split())
        self.status = status
        super().__init__(self.reason)


class InvalidImageUrl(ImageFetchError):
    """The URL cannot be fetched at all: malformed, or an unsupported scheme."""

    kind = "invalid_url"


class ImageRefused(ImageFetchError):
    """The URL points at an address the policy refuses (link-local, private, loopback)."""

    kind = "refused"


class ImageUnavailable(ImageFetchError):
    """The URL answered an error status (an expired URL is 404/410) or never answered."""

    kind = "unavailable"


class NotAnImage(ImageFetchError):
    """The server sent something that is not an image (content type not image/*)."""

    kind = "not_an_image"


class ImageTooLarge(ImageFetchError):
    """The image has more bytes than the size cap."""

    kind = "too_large"


class CorruptImage(ImageFetchError):
    """The bytes claim to be an image but Pillow cannot read their header, or their
    structure is broken (a bad CRC, a pixel stream that ends early or inflates beyond its
    declared size, a truncated scan)."""

    kind = "corrupt"
