"""GuardedFetcher over real loopback sockets: pinning, deadlines, redirects.

The resolver is stubbed: test host names map to 127.0.0.1 (or to a forbidden address the
policy refuses before connecting). No packet leaves loopback.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from flux2_pipeline.net import AddressPolicy, FetchError, FetchLimits, GuardedFetcher

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]
PNG = b"\x89PNG\r\n\x1a\n" + b"p" * 64


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[tuple[int, list[bytes]]]:
    heads: list[bytes] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            await handler(head, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], heads
    finally:
        server.close()


def answer(status: str, body: bytes = b"", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
    ).encode() + body


def resolver(table: dict[str, str]) -> Callable[[str, int], Awaitable[Sequence[str]]]:
    async def resolve(host: str, port: int) -> Sequence[str]:
        return [table[host]]

    return resolve


async def test_a_host_name_is_connected_at_the_approved_address_with_its_host_header() -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answer("200 OK", PNG, "content-type: image/png\r\n"))
        await writer.drain()

    async with serve(handler) as (port, heads):
        guarded = GuardedFetcher(
            AddressPolicy(allow_loopback=True), resolver=resolver({"images.test": "127.0.0.1"})
        )
        async with guarded:
            fetched = await guarded.fetch(f"http://images.test:{port}/a.png")
    assert fetched.data == PNG and fetched.content_type == "image/png"
    assert f"host: images.test:{port}".encode() in heads[0].lower()


async def test_a_slow_server_cannot_hold_a_download_past_the_deadline() -> None:
    async def trickle(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 1000\r\n\r\n")
        for _ in range(1000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with serve(trickle) as (port, heads):
        limits = FetchLimits(timeout=0.5, attempts=2, backoff_base=0.0)
        async with GuardedFetcher(AddressPolicy(allow_loopback=True), limits) as guarded:
            started = time.monotonic()
            with pytest.raises(FetchError) as caught:
                await guarded.fetch(f"http://127.0.0.1:{port}/slow.png")
            elapsed = time.monotonic() - started
    assert caught.value.kind == "unavailable"
    assert str(caught.value) == (
        f"no complete answer within 0.5 s from http://127.0.0.1:{port}/slow.png "
        "(gave up after 2 attempts)"
    )
    # The trickle alone would take 50 s an attempt; 2 x 0.5 s is the budget. The bound is
    # loose so a loaded machine cannot fail it, and still far below what no deadline takes.
    assert len(heads) == 2 and elapsed < 20.0


async def test_a_real_redirect_to_a_forbidden_host_is_refused_before_connecting() -> None:
    async def redirect(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answer("302 Found", extra="location: http://metadata.test/latest\r\n"))
        await writer.drain()

    table = {"images.test": "127.0.0.1", "metadata.test": "169.254.169.254"}
    async with serve(redirect) as (port, heads):
        guarded = GuardedFetcher(AddressPolicy(allow_loopback=True), resolver=resolver(table))
        async with guarded:
            with pytest.raises(
                FetchError, match=re.escape("link-local address 169.254.169.254")
            ) as caught:
                await guarded.fetch(f"http://images.test:{port}/a.png")
            probe = await guarded.probe(f"http://images.test:{port}/a.png")
    assert caught.value.kind == "refused" and not probe.ok
    assert len(heads) == 2  # one GET, one HEAD: nothing else was contacted


def _self_signed(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for `name`, and a client context trusting it."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_https_is_verified_against_the_host_name_not_the_pinned_ip(
    tmp_path: Path,
) -> None:
    server_context, client_context = _self_signed(tmp_path, "images.test")

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer("200 OK", PNG, "content-type: image/png\r\n"))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    table = {"images.test": "127.0.0.1", "impostor.test": "127.0.0.1"}
    transport = httpx.AsyncHTTPTransport(verify=client_context)
    try:
        guarded = GuardedFetcher(
            AddressPolicy(allow_loopback=True), resolver=resolver(table), transport=transport
        )
        async with guarded:
            fetched = await guarded.fetch(f"https://images.test:{port}/a.png")
            with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED") as bad:
                await guarded.fetch(f"https://impostor.test:{port}/a.png")
    finally:
        server.close()
    assert fetched.data == PNG
    assert bad.value.kind == "unavailable"
    assert "Hostname mismatch" in str(bad.value) and "impostor.test" in str(bad.value)
    assert "gave up" not in str(bad.value)  # a certificate failure is not retried
