"""The two-host test network: namespaces, a veth pair, tbf shaping, and clean removal."""

from __future__ import annotations

import subprocess
import sys

from postcopy.kit.netns import open_two_hosts

SENDER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); block = bytes(1 << 20)
for _ in range(int(sys.argv[2])): c.sendall(block)
c.close()
"""
RECEIVER = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5001), timeout=20); n = 0; t = time.monotonic()
while (d := c.recv(1 << 20)): n += len(d)
print(n, time.monotonic() - t)
"""


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_hosts_talk_over_a_shaped_link_and_vanish_afterwards() -> None:
    rate = 200_000_000  # 200 Mbit/s: 25 MB/s
    megabytes = 40
    with open_two_hosts(rate, prefix="pctest") as hosts:
        a, b = hosts.host_a, hosts.host_b
        assert {a.namespace, b.namespace} <= _namespaces()
        sender = subprocess.Popen(
            a.command([sys.executable, "-c", SENDER, a.address, str(megabytes)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert sender.stdout is not None
            assert sender.stdout.readline().strip() == "ready"
            received = subprocess.run(
                b.command([sys.executable, "-c", RECEIVER, a.address]),
                capture_output=True,
                text=True,
                timeout=30,
            )
            count, seconds = received.stdout.split()
            assert int(count) == megabytes << 20
            bits_per_second = int(count) * 8 / float(seconds)
            # Shaping is an upper bound: a noisy machine can only make it slower.
            assert bits_per_second < rate * 1.15
        finally:
            sender.kill()
            sender.wait()
    assert not {a.namespace, b.namespace} & _namespaces()
