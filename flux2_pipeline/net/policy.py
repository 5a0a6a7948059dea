"""Which addresses an untrusted URL may reach: one policy, checked on resolved IPs.

A URL that came from a table or an API answer may point anywhere, including the cloud
metadata service (169.254.169.254) or a database on the private network. The policy
decides on the *resolved* IP address, never on the host name:

- always refused: link-local (169.254.0.0/16, fe80::/10), "this network" (0.0.0.0/8,
  ::), multicast, reserved and documentation ranges, and anything else that is not
  globally routable, including IPv4 addresses wrapped in IPv6 (::ffff:a.b.c.d, NAT64,
  6to4, Teredo);
- refused unless allowed: loopback (127.0.0.0/8, ::1), allowed by `allow_loopback`
  (`AddressPolicy.for_api` sets it when the API itself is on loopback: the emulator), and
  private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7), allowed by
  `allow_private`, which also allows loopback;
- everything globally routable is allowed.

The resolver is injectable so tests map host names to loopback or to a forbidden address
without touching DNS.

Example::

    >>> policy = AddressPolicy()
    >>> policy.refusal("169.254.169.254")
    'link-local address 169.254.169.254'
    >>> policy.refusal("93.184.216.34") is None
    True
    >>> AddressPolicy.for_api("http://127.0.0.1:8188").refusal("127.0.0.1") is None
    True
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""Resolves `(host, port)` to IP address strings; `system_resolver` asks the OS."""

LOOPBACK_NAMES = frozenset({"localhost"})

_LINK_LOCAL = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
)
_THIS_NETWORK = (
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("::/128"),
)
_PRIVATE = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("fc00::/7"),
    ipaddress.ip_network("fec0::/10"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _is_loopback_host(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AddressRefused(Exception):
    """The URL's host resolves only to addresses the policy refuses; the message says why."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, NAT64, 6to4, Teredo)."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which resolved addresses an untrusted URL may connect to (see the module docstring).

    Example::

        AddressPolicy(allow_private=True)   # a deployment that serves images internally
    """

    allow_loopback: bool = False
    allow_private: bool = False

    @classmethod
    def for_api(cls, base_url: str, *, allow_private: bool = False) -> AddressPolicy:
        """The policy for a pipeline talking to `base_url`: loopback allowed for an emulator.

        >>> AddressPolicy.for_api("https://api.runcomfy.net").allow_loopback
        False
        """
        try:
            host = (urlsplit(base_url).hostname or "").lower().rstrip(".")
        except ValueError:
            host = ""
        return cls(allow_loopback=_is_loopback_host(host), allow_private=allow_private)

    def refusal(self, address: str | IPAddress) -> str | None:
        """Why `address` is refused, or None when it may be connected to."""
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            return f"not an IP address: {address!r}"
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.scope_id:
                return f"scoped IPv6 address {ip}"
            for inner in _embedded_ipv4(ip):
                reason = self.refusal(inner)
                if reason is not None:
                    return f"{reason} (inside {ip})"
            if ip.ipv4_mapped is not None:
                return None
        return self._refusal(ip)

    def _refusal(self, ip: IPAddress) -> str | None:
        if any(ip in net for net in _LINK_LOCAL):
            return f"link-local address {ip}"
        if any(ip in net for net in _THIS_NETWORK) or ip.is_unspecified:
            return f"unspecified address {ip}"
        if ip.is_multicast:
            return f"multicast address {ip}"
        if ip.is_loopback:
            if self.allow_loopback or self.allow_private:
                return None
            return f"loopback address {ip} (allowed only when the API is on loopback)"
        if any(ip in net for net in _PRIVATE):
            if self.allow_private:
                return None
            return f"private address {ip} (not allowed by the address policy)"
        if not ip.is_global:
            return f"non-routable address {ip}"
        return None

    def choose(self, addresses: Sequence[str]) -> str:
        """The first address the policy allows; raises `AddressRefused` when there is none."""
        reasons: list[str] = []
        for address in addresses:
            reason = self.refusal(address)
            if reason is None:
                return address
            reasons.append(reason)
        if not reasons:
            raise AddressRefused("the host resolved to no address")
        raise AddressRefused(reasons[0])


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """The host's addresses from the operating system's resolver (getaddrinfo)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
