"""Loopback for tests: ports (one refusing connections, one free), a resolver, a policy.

Example:
    >>> port = refused_port()  # connecting to 127.0.0.1:port is refused until exit
    >>> await sync_images(refs, store, manifest, policy=LOOPBACK, resolver=to_loopback)
"""

from __future__ import annotations

import socket

from flux2_pipeline.media import AddressPolicy

# The address policy of tests whose servers (or MockTransport) are on loopback.
LOOPBACK = AddressPolicy(allow_loopback=True)

_HELD_PORTS: list[socket.socket] = []


def refused_port() -> int:
    """A loopback port this process holds bound and never listens on: connections are refused.

    The socket stays bound until the test process exits, so no other test or process can
    take the port in between (unlike binding port 0, closing it, then using the number).
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(sock)
    return int(sock.getsockname()[1])


def free_port() -> int:
    """A loopback port free right now, for a server a subprocess starts on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def to_loopback(host: str, port: int) -> list[str]:
    """A stub resolver: every test host is on loopback (MockTransport answers anyway)."""
    return ["127.0.0.1"]
