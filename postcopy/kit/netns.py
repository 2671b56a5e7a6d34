"""Two test hosts on one machine: network namespaces joined by a veth pair (pyroute2).

`open_two_hosts()` creates namespaces for Host A and Host B, a veth pair between them with
link-local addresses (169.254.x.y/30: never routed, so nothing leaves the pair), loopback up in
each, and optionally shapes both directions of the link to a rate with a token-bucket filter
(`tbf`; the netem qdisc is not available here).  Processes run inside a host with
`host.command([...])`, which prefixes `ip netns exec NAME`.  Unix sockets are files, reachable
from every namespace; TCP between the hosts goes over the shaped link.  The namespaces have no
default route: their traffic cannot leave the pair.  Everything is removed on
exit, also on errors and Ctrl-C.  Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from postcopy.errors import UserError


@dataclass(frozen=True)
class TestHost:
    namespace: str
    interface: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass(frozen=True)
class TwoHosts:
    host_a: TestHost
    host_b: TestHost
    rate_bits_per_second: int | None


def can_create_namespaces() -> bool:
    return os.geteuid() == 0 and os.path.exists("/proc/self/ns/net")


def _burst_bytes(rate_bits_per_second: int) -> int:
    # Enough tokens for ~2 ms at the rate (at least 64 KiB): smooth shaping without starving TSO.
    return max(64 * 1024, rate_bits_per_second // 8 // 500)


@contextmanager
def open_two_hosts(
    rate_bits_per_second: int | None = None, *, prefix: str = "postcopy"
) -> Iterator[TwoHosts]:
    """Create Host A and Host B joined by a veth pair; remove both on exit."""
    if not can_create_namespaces():
        raise UserError("network namespaces need root (CAP_NET_ADMIN)")
    from pyroute2 import IPRoute, NetNS, netns

    tag = f"{os.getpid():x}{secrets.token_hex(2)}"
    names = (f"{prefix}-a-{tag}", f"{prefix}-b-{tag}")
    interfaces = (f"pca{tag}"[:15], f"pcb{tag}"[:15])
    third_octet = 1 + secrets.randbelow(250)
    addresses = (f"169.254.{third_octet}.1", f"169.254.{third_octet}.2")
    created: list[str] = []
    try:
        for name in names:
            netns.create(name)
            created.append(name)
        with IPRoute() as ipr:
            ipr.link("add", ifname=interfaces[0], kind="veth", peer={"ifname": interfaces[1]})
            for name, interface in zip(names, interfaces, strict=True):
                index = ipr.link_lookup(ifname=interface)[0]
                ipr.link("set", index=index, net_ns_fd=name)
        for name, interface, address in zip(names, interfaces, addresses, strict=True):
            with NetNS(name) as ns:
                index = ns.link_lookup(ifname=interface)[0]
                ns.addr("add", index=index, address=address, prefixlen=30)
                ns.link("set", index=index, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                if rate_bits_per_second:
                    ns.tc(
                        "add",
                        "tbf",
                        index=index,
                        rate=f"{rate_bits_per_second}bit",
                        burst=_burst_bytes(rate_bits_per_second),
                        latency="50ms",
                    )
        hosts = [
            TestHost(name, interface, address)
            for name, interface, address in zip(names, interfaces, addresses, strict=True)
        ]
        yield TwoHosts(hosts[0], hosts[1], rate_bits_per_second)
    finally:
        for name in created:
            with contextlib.suppress(OSError):
                netns.remove(name)  # removing a namespace destroys the veth end inside it
