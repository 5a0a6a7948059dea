"""A token never goes over plain http to a remote host."""

from __future__ import annotations

import pytest

from flux2_pipeline.runcomfy import AsyncRunComfyClient
from flux2_pipeline.runcomfy.security import InsecureBaseUrl, require_secure_base_url

TOKEN = "sk-never-in-clear-91c2"


@pytest.mark.parametrize(
    "base_url", ["http://api.example.com", "HTTP://api.example.com:8080/v1", "http://10.0.0.5"]
)
async def test_the_client_refuses_a_remote_http_base_url_with_a_token(base_url: str) -> None:
    with pytest.raises(InsecureBaseUrl) as caught:
        AsyncRunComfyClient(TOKEN, base_url)
    message = str(caught.value)
    assert "\n" not in message and TOKEN not in message
    assert "use https:// for a remote API" in message


@pytest.mark.parametrize(
    ("base_url", "token"),
    [
        ("https://api.example.com", TOKEN),
        ("http://127.0.0.1:8188", TOKEN),
        ("http://127.9.0.1:8188", TOKEN),
        ("http://localhost:8188", TOKEN),
        ("http://[::1]:8188", TOKEN),
        ("http://api.example.com", None),
    ],
)
async def test_https_loopback_or_no_token_are_accepted(base_url: str, token: str | None) -> None:
    require_secure_base_url(base_url, has_token=token is not None)
    async with AsyncRunComfyClient(token, base_url):
        pass
