"""Which reverse proxies may name the client, and who the client is behind them.

``X-Forwarded-For`` is a list any client can write; only the entries that our own
proxies appended are facts. A proxy appends the address of the peer it accepted, so
reading the list from the right, past the entries that are themselves trusted
proxies, the first other address is the client as the outermost trusted proxy saw
it. Everything left of it was written by that client and is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str) -> Address | None:
    """An IP address from a peer or a forwarded-for entry, or None if it is not one.

    Accepts what proxies write besides a bare address: ``1.2.3.4:5678``,
    ``[2001:db8::1]:443``, ``[2001:db8::1]``. An IPv4-mapped IPv6 address (what a
    dual-stack socket reports for an IPv4 peer) is its IPv4 address.
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The addresses and networks whose ``X-Forwarded-For`` is believed.

    Raises ValueError, naming the entry, for one that is neither an address nor a
    CIDR network.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        networks: list[Network] = []
        for entry in entries:
            try:
                # strict=False: 10.0.0.1/8 means the network 10.0.0.0/8, as in most
                # firewall and proxy configurations.
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"invalid trusted proxy {entry!r}: give an IP address or a CIDR "
                    "network such as 10.0.0.0/8"
                ) from None
        self._networks = tuple(networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str) or not self._networks:
            return False
        parsed = parse_address(address)
        return parsed is not None and any(parsed in network for network in self._networks)

    def client(self, peer: str, forwarded_for: str | None) -> str:
        """The client's address: ``peer``, or from ``forwarded_for`` if ``peer`` is trusted.

        The right-most entry that is not a trusted proxy; if every entry is one, the
        left-most. An entry that is not an address ends the walk at the nearest
        trusted hop to its right (at worst ``peer``): a proxy that writes something
        else cannot be followed further. The answer is a normalized address, except
        a ``peer`` that is not one, which is returned as it is.
        """
        if not forwarded_for or peer not in self:
            return _normal(peer)
        known = _normal(peer)
        for entry in reversed(forwarded_for.split(",")):
            hop = parse_address(entry)
            if hop is None:
                return known
            known = str(hop)
            if known not in self:
                return known
        return known


def _normal(text: str) -> str:
    parsed = parse_address(text)
    return text if parsed is None else str(parsed)
