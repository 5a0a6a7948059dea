"""Why an image could not be stored: one exception tree, drawn once.

    ImageFetchError            (url, reason; every failure of one image)
    ├── ImageUnavailable       HTTP error status (404/410: expired URL), or transient
    │                          errors that outlasted every retry
    ├── NotAnImage             the response's content type is not image/*
    ├── ImageTooLarge          more bytes than the configured cap
    └── CorruptImage           the bytes do not decode as an image

Example::

    try:
        fetched = await fetcher.fetch(url)
    except ImageFetchError as exc:
        print(exc.kind, exc)   # "unavailable", "HTTP 404 Not Found from https://..."
"""

from __future__ import annotations


class ImageFetchError(Exception):
    """One image could not be fetched, verified or stored; `kind` names the family."""

    kind = "error"

    def __init__(self, url: str, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.url = url
        self.reason = reason
        self.status = status


class ImageUnavailable(ImageFetchError):
    """The URL answered an error status (an expired URL is 404/410) or never answered."""

    kind = "unavailable"


class NotAnImage(ImageFetchError):
    """The server sent something that is not an image (content type not image/*)."""

    kind = "not_an_image"


class ImageTooLarge(ImageFetchError):
    """The image is bigger than the configured size cap."""

    kind = "too_large"


class CorruptImage(ImageFetchError):
    """The bytes claim to be an image but Pillow cannot decode them."""

    kind = "corrupt"
