"""Which addresses the ``http`` channel may connect to.

A publisher names the URL, so without a check Herald would POST to its own
loopback services, the private network it runs in, or a cloud metadata
endpoint. By default the channel refuses every address that is not public
unicast: loopback, unspecified, private (RFC 1918, IPv6 unique local),
link-local (``169.254.169.254`` included), shared CGNAT space, multicast,
broadcast, reserved, documentation and benchmarking ranges, and IPv6
addresses that embed such an IPv4 address (IPv4-mapped, NAT64, 6to4).
``HERALD_HTTP_ALLOW_NETWORKS`` lets an operator allow some networks.

The check runs in the connection layer (:class:`GuardedConnector`) on the
addresses the connection is actually made to, after name resolution: a
public name that resolves to a private address is refused, and there is no
gap between checking a name and connecting to what it resolved to. Redirects
are never followed, so a public endpoint cannot bounce the request inward.

:func:`address_problem` and :func:`literal_address` are pure so that every
range and every odd spelling is unit-tested without sending a packet.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import ResolveResult

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

#: The ``error_code`` of a message refused here (its error_type is ``invalid_recipient``).
DESTINATION_NOT_ALLOWED = "destination_not_allowed"


def _table(rows: Iterable[tuple[str, str]]) -> tuple[tuple[Network, str], ...]:
    return tuple((ipaddress.ip_network(cidr), why) for cidr, why in rows)


# IANA's special-purpose registries (RFC 6890 and successors); the first match names the reason.
_BLOCKED_V4 = _table([
    ("0.0.0.0/8", "unspecified ('this network')"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
])
_BLOCKED_V6 = _table([
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignments (Teredo included)"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing (SRv6)"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
])
_GLOBAL_UNICAST_V6 = IPv6Network("2000::/3")
_NAT64 = IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = IPv6Network("2002::/16")


def address_problem(address: Address, allow: Sequence[Network] = ()) -> str | None:
    """Why ``address`` may not be connected to, or None when it may.

    An address inside one of the ``allow`` networks may always be used. An
    IPv4-mapped IPv6 address is judged as the IPv4 address it is. An IPv6
    address that carries an IPv4 address for a translator to reach (NAT64,
    6to4) is refused when that IPv4 address would be; this is not lifted by
    ``allow``, which names the networks Herald itself connects to.
    """
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allow):
        return None
    if isinstance(address, IPv4Address):
        return _first(_BLOCKED_V4, address)
    # A scope (fe80::1%eth0) does not change which range the address is in.
    bare = IPv6Address(int(address))
    found = _first(_BLOCKED_V6, bare)
    if found is not None:
        return found
    embedded: IPv4Address | None = None
    if bare in _NAT64:
        embedded = IPv4Address(int(bare) & 0xFFFFFFFF)
    elif bare in _SIX_TO_FOUR:
        embedded = bare.sixtofour
    if embedded is not None:
        inner = _first(_BLOCKED_V4, embedded)
        return None if inner is None else f"embeds {embedded}, {inner}"
    if bare not in _GLOBAL_UNICAST_V6:
        return "not global unicast"
    return None


def _first(table: tuple[tuple[Network, str], ...], address: Address) -> str | None:
    for network, why in table:
        if address in network:
            return why
    return None


# One to four parts, each decimal, octal (leading 0) or hex (0x): what inet_aton
# (and so getaddrinfo) reads as an IPv4 address: 2130706433, 0x7f000001, 127.1.
_LEGACY_PART = r"(?:0[xX][0-9a-fA-F]*|[0-9]+)"
_LEGACY_V4_RE = re.compile(rf"{_LEGACY_PART}(?:\.{_LEGACY_PART}){{0,3}}\.?")


def literal_address(host: str) -> Address | None:
    """The address ``host`` spells, when it is an IP literal in any form the
    system's resolver would accept; None for a name.

    Besides the usual forms this reads the legacy IPv4 spellings
    (``2130706433``, ``0x7f000001``, ``017700000001``, ``127.1``), which
    ``getaddrinfo`` turns into addresses without asking DNS.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if not _LEGACY_V4_RE.fullmatch(text):
        return None
    parts = []
    for part in text.rstrip(".").split("."):
        if part[:2] in ("0x", "0X"):
            parts.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            try:
                parts.append(int(part, 8))
            except ValueError:  # 08, 09: not octal, and not an address either
                return None
        else:
            parts.append(int(part))
    # The last part fills the bits the others leave: a.b.c.d, a.b.c(16), a.b(24), a(32).
    *head, last = parts
    if any(p > 0xFF for p in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    value = 0
    for p in head:
        value = value << 8 | p
    return IPv4Address(value << (8 * (4 - len(head))) | last)


def _canonical(host: str) -> bool:
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class DestinationNotAllowed(aiohttp.ClientConnectionError):
    """The destination resolves only to addresses the ``http`` channel may not reach."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        super().__init__(f"destination {host} ({address}) is not allowed: {reason};"
                         " HERALD_HTTP_ALLOW_NETWORKS can allow it")
        self.host = host
        self.address = address
        self.reason = reason


def url_problem(url: str) -> str | None:
    """Why a URL may not be used as a destination before any address is known.

    Credentials in the URL (``user:pass@``) would be sent as Basic auth to
    whoever the publisher names; they are refused rather than stripped so
    the publisher learns of it.
    """
    try:
        authority = urlsplit(url).netloc
    except ValueError:
        return None  # the request itself reports an unusable URL
    # Any "@" in the authority: with several, parsers disagree on where the host starts.
    if "@" in authority:
        return "URLs with credentials (user:pass@) are not allowed"
    return None


class GuardedConnector(aiohttp.TCPConnector):
    """A :class:`aiohttp.TCPConnector` that connects only to permitted addresses.

    Every resolution result (and an IP literal, which aiohttp does not
    resolve) passes through :meth:`permitted` before aiohttp builds the
    socket addresses it connects to, so what is checked is what is used.
    """

    def __init__(self, *, allow: Sequence[Network] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allow = tuple(allow)

    async def _resolve_host(self, host: str, port: int, traces: Any = None
                            ) -> list[ResolveResult]:
        literal = literal_address(host)
        if literal is not None:
            problem = address_problem(literal, self.allow)
            if problem is None and not _canonical(host):
                # 127.1 or 2130706433 for an allowed address: no receiver is
                # named so, and resolvers disagree about it; refused everywhere.
                problem = "an IPv4 address in a legacy spelling"
            if problem is not None:
                raise DestinationNotAllowed(host, str(literal), problem)
        return self.permitted(host, await super()._resolve_host(host, port, traces=traces))

    def permitted(self, host: str, results: list[ResolveResult]) -> list[ResolveResult]:
        """The results whose address may be connected to; refused when none is.

        A name that resolves to both public and private addresses keeps only
        the public ones (the private ones are never tried).
        """
        kept: list[ResolveResult] = []
        refused: tuple[str, str] | None = None
        for result in results:
            try:
                address = ipaddress.ip_address(result["host"])
            except ValueError:
                problem: str | None = "not an IP address"
            else:
                problem = address_problem(address, self.allow)
            if problem is None:
                kept.append(result)
            elif refused is None:
                refused = (result["host"], problem)
        if not kept:
            shown, reason = refused or ("no address", "the name did not resolve")
            raise DestinationNotAllowed(host, shown, reason)
        return kept


def open_session(*, allow: Sequence[Network], limit: int, connect_timeout_s: float
                 ) -> aiohttp.ClientSession:
    """The ``http`` channel's own session: guarded connector, no cookie jar.

    Endpoints are strangers to each other, so none may set a cookie that
    Herald would then send to another (DummyCookieJar keeps nothing), and
    proxies from the environment are not used (a proxy would connect on our
    behalf, out of the guard's sight).
    """
    connector = GuardedConnector(allow=allow, limit=limit, limit_per_host=0,
                                 enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout_s),
    )
