"""The address policy decides on resolved IPs; nothing here touches the network."""

from __future__ import annotations

import re

import pytest

from flux2_pipeline.net import AddressPolicy, AddressRefused

ALWAYS_REFUSED = [
    "169.254.169.254",
    "169.254.0.1",
    "fe80::1",
    "0.0.0.0",
    "0.1.2.3",
    "::",
    "224.0.0.1",
    "ff02::1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.10",
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",
    "2002:a9fe:a9fe::1",
]
LOOPBACK = ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"]
PRIVATE = ["10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "fd00::1", "::ffff:10.0.0.1"]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", ALWAYS_REFUSED)
@pytest.mark.parametrize(
    "policy",
    [AddressPolicy(), AddressPolicy(allow_loopback=True), AddressPolicy(allow_private=True)],
)
def test_link_local_and_specials_are_refused_whatever_is_allowed(
    address: str, policy: AddressPolicy
) -> None:
    assert policy.refusal(address) is not None


@pytest.mark.parametrize("address", LOOPBACK)
def test_loopback_only_when_allowed(address: str) -> None:
    assert "loopback" in (AddressPolicy().refusal(address) or "")
    assert AddressPolicy(allow_loopback=True).refusal(address) is None
    assert AddressPolicy(allow_private=True).refusal(address) is None


@pytest.mark.parametrize("address", PRIVATE)
def test_private_only_when_allowed(address: str) -> None:
    assert "private" in (AddressPolicy(allow_loopback=True).refusal(address) or "")
    assert AddressPolicy(allow_private=True).refusal(address) is None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert AddressPolicy().refusal(address) is None


def test_for_api_allows_loopback_only_for_a_loopback_api() -> None:
    assert AddressPolicy.for_api("http://127.0.0.1:8188").allow_loopback
    assert AddressPolicy.for_api("http://localhost:8188").allow_loopback
    assert AddressPolicy.for_api("http://127.0.0.2:8188").allow_loopback
    assert not AddressPolicy.for_api("http://[::1/").allow_loopback
    assert AddressPolicy.for_api("http://[::1]:8188/").allow_loopback
    remote = AddressPolicy.for_api("https://api.runcomfy.net")
    assert not remote.allow_loopback and not remote.allow_private
    assert AddressPolicy.for_api("https://api.runcomfy.net", allow_private=True).allow_private


def test_choose_takes_the_first_allowed_address_and_refuses_when_none() -> None:
    policy = AddressPolicy()
    assert policy.choose(["169.254.169.254", "93.184.216.34"]) == "93.184.216.34"
    with pytest.raises(AddressRefused, match=re.escape("link-local address 169.254.169.254")):
        policy.choose(["169.254.169.254", "10.0.0.1"])
    with pytest.raises(AddressRefused, match=re.escape("no address")):
        policy.choose([])
