"""Which addresses the http channel may connect to (consumer/providers/destinations.py).

Pure checks only: no packet is sent here. The end-to-end cases (on loopback
only) are in tests/integration/test_outbound_edge.py.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from consumer.errors import ConfigError
from consumer.providers.destinations import (
    DestinationNotAllowed,
    GuardedConnector,
    address_problem,
    literal_address,
    url_problem,
)
from consumer.settings import Settings

LOOPBACK_8 = (ipaddress.ip_network("127.0.0.0/8"),)


# Every address below must be refused by default, with its reason named.
REFUSED = [
    # loopback
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("127.1.2.3", "loopback"),
    ("::1", "loopback"),
    # unspecified
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    # private (RFC 1918) and IPv6 unique local
    ("10.0.0.1", "private"), ("10.255.255.255", "private"), ("172.16.0.1", "private"),
    ("172.31.255.254", "private"), ("192.168.1.1", "private"), ("fc00::1", "unique local"),
    ("fd12:3456:789a::1", "unique local"),
    # link-local, the cloud metadata address included
    ("169.254.169.254", "link-local"), ("169.254.0.1", "link-local"), ("fe80::1", "link-local"),
    ("fe80::1%1", "link-local"), ("febf::1", "link-local"), ("fec0::1", "site-local"),
    # CGNAT
    ("100.64.0.1", "CGNAT"), ("100.127.255.254", "CGNAT"),
    # multicast, broadcast, reserved
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"), ("255.255.255.255", "broadcast"), ("240.0.0.1", "reserved"),
    ("250.1.2.3", "reserved"),
    # documentation, benchmarking and protocol ranges
    ("192.0.2.1", "documentation"), ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"), ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"), ("198.18.0.1", "benchmarking"),
    ("198.19.255.254", "benchmarking"), ("192.0.0.8", "IETF"), ("192.88.99.1", "6to4 relay"),
    ("2001::1", "Teredo"), ("100::1", "discard"), ("64:ff9b:1::1", "local-use NAT64"),
    ("5f00::1", "SRv6"),
    # IPv4-mapped IPv6: judged as the IPv4 address it is
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "link-local"), ("::ffff:0.0.0.0", "unspecified"),
    # NAT64 and 6to4 embedding a refused IPv4 address
    ("64:ff9b::127.0.0.1", "embeds 127.0.0.1, loopback"),
    ("64:ff9b::10.0.0.1", "embeds 10.0.0.1, private"),
    ("64:ff9b::a9fe:a9fe", "embeds 169.254.169.254, link-local"),
    ("2002:7f00:1::1", "embeds 127.0.0.1, loopback"),
    ("2002:a00:1::", "embeds 10.0.0.1, private"),
    ("2002:c0a8:101::1", "embeds 192.168.1.1, private"),
    # outside global unicast altogether
    ("::127.0.0.1", "not global unicast"), ("4000::1", "not global unicast"),
    ("1::1", "not global unicast"),
]

ALLOWED = [
    "8.8.8.8", "1.1.1.1", "93.184.215.14", "100.63.255.255", "100.128.0.1", "172.15.255.255",
    "172.32.0.1", "192.167.255.255", "192.169.0.1", "169.253.255.255", "223.255.255.255",
    "11.0.0.1", "2606:4700:4700::1111", "2a00:1450:4007:80e::200e", "2001:4860:4860::8888",
    "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1",
]


@pytest.mark.parametrize("text,why", REFUSED)
def test_non_public_addresses_are_refused_with_their_reason(text: str, why: str) -> None:
    problem = address_problem(ipaddress.ip_address(text))
    assert problem is not None and why in problem, (text, problem)


@pytest.mark.parametrize("text", ALLOWED)
def test_public_addresses_are_allowed(text: str) -> None:
    assert address_problem(ipaddress.ip_address(text)) is None


def test_allowed_networks_lift_the_refusal_for_those_networks_only() -> None:
    allow = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.20.0.0/16"),
             ipaddress.ip_network("fd00:1::/32"))
    for text in ("127.0.0.1", "127.9.9.9", "10.20.3.4", "fd00:1::5", "::ffff:127.0.0.1",
                 "::ffff:10.20.0.1"):
        assert address_problem(ipaddress.ip_address(text), allow) is None, text
    for text in ("10.21.0.1", "::1", "169.254.169.254", "192.168.0.1", "fd00:2::1"):
        assert address_problem(ipaddress.ip_address(text), allow) is not None, text


def test_an_allowed_network_does_not_open_translated_addresses() -> None:
    # Allowing 127.0.0.0/8 is about Herald's own loopback, not a translator's.
    for text in ("64:ff9b::127.0.0.1", "2002:7f00:1::1"):
        assert address_problem(ipaddress.ip_address(text), LOOPBACK_8) is not None


# -- how a host is read ---------------------------------------------------------------------


@pytest.mark.parametrize("host,address", [
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),  # one decimal number
    ("0x7f000001", "127.0.0.1"),  # hex
    ("0X7F000001", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),  # octal
    ("0177.0.0.1", "127.0.0.1"),  # octal first part
    ("0x7f.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),  # short forms: a.b (24-bit tail), a.b.c (16-bit tail)
    ("127.0.1", "127.0.0.1"),
    ("127.000.000.001", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("0x0", "0.0.0.0"),
    ("167772161", "10.0.0.1"),
    ("10.1", "10.0.0.1"),
    ("2852039166", "169.254.169.254"),
    ("0xa9fea9fe", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"),
    ("127.0.0.1.", "127.0.0.1"),
    ("[::1]", "::1"),
    ("::1", "::1"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("[0:0:0:0:0:0:0:1]", "::1"),
    ("[::ffff:7f00:1]", "::ffff:7f00:1"),
    ("fe80::1%eth0", "fe80::1%eth0"),
])
def test_every_spelling_of_an_address_is_read_as_that_address(host: str, address: str) -> None:
    assert literal_address(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", [
    "2130706433", "0x7f000001", "017700000001", "127.1", "127.0.1", "0", "0.0.0.0", "[::]",
    "[::1]", "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]", "0xa9fea9fe", "2852039166",
    "[64:ff9b::a00:1]", "[2002:a00:1::]", "[fe80::1]", "100.64.0.1", "[fd00::1]",
])
def test_every_spelling_of_a_private_address_is_refused(host: str) -> None:
    address = literal_address(host)
    assert address is not None and address_problem(address) is not None, host


@pytest.mark.parametrize("host", [
    "example.com", "localhost", "127.0.0.1.nip.io", "1e100.net", "08.1", "09", "0x", "1.2.3.4.5",
    "256.1.1.1", "1.2.3.256", "4294967296", "", "[example.com]", "0x1g",
])
def test_names_and_impossible_numbers_are_not_literals(host: str) -> None:
    # 0x alone is read as 0 by inet_aton; everything else here is a name or nothing.
    if host == "0x":
        assert literal_address(host) == ipaddress.ip_address("0.0.0.0")
    else:
        assert literal_address(host) is None


@pytest.mark.parametrize("spelling", ["2130706433", "0x7f000001", "017700000001", "127.1",
                                      "127.0.1", "0177.0.0.1"])
def test_legacy_spellings_agree_with_the_system_parser(spelling: str) -> None:
    # inet_aton is what getaddrinfo uses for numeric hosts; no packet is sent.
    assert literal_address(spelling) == ipaddress.ip_address(socket.inet_aton(spelling))


@pytest.mark.parametrize("url", [
    "http://user:pass@127.0.0.1:8080/", "https://user@example.com/hook",
    "http://:secret@example.com/", "http://a@b@example.com/", "https://example.com@10.0.0.1/",
])
def test_urls_with_credentials_are_refused(url: str) -> None:
    assert url_problem(url) is not None


@pytest.mark.parametrize("url", [
    "https://example.com/hook?to=a@b.c", "https://example.com/a@b", "http://127.0.0.1:8080/x",
    "https://[::1]/#frag@x",
])
def test_urls_without_credentials_pass_the_url_check(url: str) -> None:
    assert url_problem(url) is None


# -- the connector's filter on a resolution result ------------------------------------------


def _result(host: str, family: int = socket.AF_INET) -> Any:
    return {"hostname": "hooks.example.com", "host": host, "port": 443, "family": family,
            "proto": 0, "flags": 0}


async def test_a_name_resolving_to_a_private_address_is_refused() -> None:
    connector = GuardedConnector()
    try:
        with pytest.raises(DestinationNotAllowed) as caught:
            connector.permitted("hooks.example.com", [_result("10.0.0.5")])
        assert caught.value.reason == "private"
        assert "hooks.example.com" in str(caught.value) and "10.0.0.5" in str(caught.value)
        with pytest.raises(DestinationNotAllowed):
            connector.permitted("metadata.example.com", [_result("169.254.169.254"),
                                                         _result("fd00::1", socket.AF_INET6)])
        with pytest.raises(DestinationNotAllowed):
            connector.permitted("x.example.com", [_result("::ffff:127.0.0.1", socket.AF_INET6)])
    finally:
        await connector.close()


async def test_only_the_public_addresses_of_a_mixed_answer_are_kept() -> None:
    connector = GuardedConnector()
    try:
        results = [_result("127.0.0.1"), _result("93.184.215.14"),
                   _result("fe80::1", socket.AF_INET6), _result("2606:4700::1", socket.AF_INET6)]
        kept = connector.permitted("hooks.example.com", results)
        assert [r["host"] for r in kept] == ["93.184.215.14", "2606:4700::1"]
    finally:
        await connector.close()


async def test_the_allow_list_applies_to_resolved_addresses() -> None:
    connector = GuardedConnector(allow=LOOPBACK_8)
    try:
        kept = connector.permitted("localhost", [_result("127.0.0.1"),
                                                 _result("::1", socket.AF_INET6)])
        assert [r["host"] for r in kept] == ["127.0.0.1"]
    finally:
        await connector.close()


async def test_a_result_that_is_not_an_address_is_refused() -> None:
    connector = GuardedConnector()
    try:
        with pytest.raises(DestinationNotAllowed):
            connector.permitted("odd.example.com", [_result("not-an-address")])
    finally:
        await connector.close()


async def test_a_refused_literal_never_reaches_the_resolver() -> None:
    class Resolver:
        calls: list[str] = []

        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[Any]:
            self.calls.append(host)
            return []

        async def close(self) -> None:
            return None

    resolver = Resolver()
    connector = GuardedConnector(resolver=resolver)  # type: ignore[arg-type]
    try:
        for host in ("2130706433", "127.1", "0x7f000001", "::1", "169.254.169.254"):
            with pytest.raises(DestinationNotAllowed):
                await connector._resolve_host(host, 80)
        assert resolver.calls == []
    finally:
        await connector.close()


async def test_legacy_spellings_are_refused_even_inside_an_allowed_network() -> None:
    connector = GuardedConnector(allow=LOOPBACK_8)
    try:
        for host in ("127.1", "2130706433", "0x7f000001", "017700000001", "0177.0.0.1"):
            with pytest.raises(DestinationNotAllowed) as caught:
                await connector._resolve_host(host, 80)
            assert "legacy spelling" in caught.value.reason
    finally:
        await connector.close()


async def test_a_name_is_checked_on_what_the_resolver_answers() -> None:
    class Resolver:
        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[Any]:
            return [_result("10.1.2.3")]

        async def close(self) -> None:
            return None

    connector = GuardedConnector(resolver=Resolver(), use_dns_cache=False)  # type: ignore[arg-type]
    try:
        with pytest.raises(DestinationNotAllowed) as caught:
            await connector._resolve_host("public-looking.example.com", 443)
        assert caught.value.address == "10.1.2.3"
    finally:
        await connector.close()


# -- settings -----------------------------------------------------------------------------


def test_allow_networks_setting_is_parsed() -> None:
    s = Settings.from_env({"HERALD_HTTP_ALLOW_NETWORKS": " 127.0.0.0/8, ::1 ,10.1.2.3/16,"})
    assert s.http_allow_networks == (ipaddress.ip_network("127.0.0.0/8"),
                                     ipaddress.ip_network("::1/128"),
                                     ipaddress.ip_network("10.1.0.0/16"))
    assert Settings.from_env({}).http_allow_networks == ()


@pytest.mark.parametrize("value", ["127.0.0.0/33", "localhost", "10.0.0.0/8;192.168.0.0/16",
                                   "::1/129", "127.0.0.0/8,nope"])
def test_a_bad_network_is_one_line_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"HERALD_HTTP_ALLOW_NETWORKS": value})
    message = str(caught.value)
    assert message.startswith("HERALD_HTTP_ALLOW_NETWORKS: ")
    assert "\n" not in message
