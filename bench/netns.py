"""Hosts made of Linux network namespaces for `make hosts`: a bridge of our own, cuts that drop silently.

Each host is a namespace `mgh-<name>` with one veth (`eth0` inside) on the bridge `mgh-br` in the root
namespace, and one address in SUBNET. The root namespace holds the bridge's own address (the driver
reaches every host from there). No host gets a default route and nothing is forwarded or NATed:
traffic goes only among the namespaces made here.

A cut is a silent partition, as a real network fails: an `ip rule` in the host's namespace sends its
packets for one address and TCP port to a table whose only route leads into a veth whose peer is down,
where they vanish (this kernel has no tc classifiers and no iptables). Connections stall, new ones time
out; healing deletes the rule and the stalled connections carry on. Everything is undone by `remove()`,
which also clears what an earlier, killed run left behind (any namespace or link named `mgh-*`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

PREFIX = "mgh-"
BRIDGE = f"{PREFIX}br"
SUBNET = "10.213.0"
GATEWAY = f"{SUBNET}.1"
CUT_TABLE = "213"


class NamespaceError(RuntimeError):
    """Network namespaces cannot be made here (the message says why)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def preflight() -> None:
    """Raise NamespaceError unless this process can make namespaces, veths and a bridge."""
    if os.geteuid() != 0:
        raise NamespaceError("make hosts needs root (it creates network namespaces, veths and a bridge)")
    if shutil.which("ip") is None:
        raise NamespaceError("make hosts needs the `ip` command (Debian: apt-get install iproute2)")
    probe = f"{PREFIX}probe"
    ip("netns", "del", probe, check=False)
    try:
        ip("netns", "add", probe)
    finally:
        ip("netns", "del", probe, check=False)
    for route in json.loads(ip("-j", "route", "show").stdout or "[]"):
        dst = route.get("dst", "")
        if dst.startswith(f"{SUBNET}.") and route.get("dev") != BRIDGE:
            raise NamespaceError(f"{SUBNET}.0/24 is already routed here ({dst} dev {route.get('dev')})")


@dataclass(frozen=True)
class Host:
    name: str
    address: str

    @property
    def ns(self) -> str:
        return f"{PREFIX}{self.name}"


_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the driver dies (the next run clears what is left).
    Only a system call here: libc is loaded in the parent, since other threads may hold locks."""
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Network:
    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = {host.name: host for host in hosts}
        self._cuts: set[tuple[str, str, int]] = set()

    # --- making and removing ----------------------------------------------------------------------

    def create(self) -> None:
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for host in self.hosts.values():
            ns, outside = host.ns, host.ns
            ip("netns", "add", ns)
            ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", outside, "master", BRIDGE, "up")
            ip("-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            # The sink of cuts: a veth whose peer stays down drops what it is given, silently.
            ip("-n", ns, "link", "add", "sink", "type", "veth", "peer", "name", "sinkpeer")
            ip("-n", ns, "link", "set", "sink", "up")

    @staticmethod
    def remove() -> list[str]:
        """Kill every process in our namespaces and delete them and our links; returns what it removed."""
        names = [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
        ours = [name for name in names if name.startswith(PREFIX)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [pid for name in ours for pid in namespace_pids(name)]
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while alive and time.monotonic() < deadline:
                time.sleep(0.1)
                alive = [pid for name in ours for pid in namespace_pids(name)]
            if not alive:
                break
        for name in ours:
            ip("netns", "del", name, check=False)
        links = json.loads(ip("-j", "link", "show").stdout or "[]")
        removed_links = [link["ifname"] for link in links if link.get("ifname", "").startswith(PREFIX)]
        for name in removed_links:
            ip("link", "del", name, check=False)
        return ours + [name for name in removed_links if name not in ours]

    # --- processes ----------------------------------------------------------------------------------

    def spawn(
        self, host: str, argv: list[str], *, env: dict[str, str], log: IO[bytes], cwd: Path
    ) -> subprocess.Popen[bytes]:
        """Run `argv` inside the host's namespace (`ip netns exec` execs it: the pid is the program's)."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[host].ns, *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            preexec_fn=_die_with_parent,
        )

    def kill_host(self, host: str) -> int:
        """SIGKILL every process of the host, as a power cut would; returns how many."""
        pids = namespace_pids(self.hosts[host].ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while namespace_pids(self.hosts[host].ns) and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(pids)

    # --- partitions ---------------------------------------------------------------------------------

    def cut(self, host: str, to: str, port: int) -> None:
        """From now on the host's TCP packets to `to`:`port` vanish (both new and open connections)."""
        ns, address = self.hosts[host].ns, self.hosts[to].address
        ip("-n", ns, "route", "replace", "default", "dev", "sink", "table", CUT_TABLE)
        # No ARP on the sink: a fixed neighbour, so packets are handed over (and dropped) at once.
        ip("-n", ns, "neigh", "replace", address, "lladdr", "02:00:00:00:02:13", "dev", "sink", "nud", "permanent")
        ip("-n", ns, "rule", "add", "to", address, "ipproto", "tcp", "dport", str(port), "lookup", CUT_TABLE)
        self._cuts.add((host, to, port))

    def heal(self, host: str, to: str, port: int) -> None:
        ns, address = self.hosts[host].ns, self.hosts[to].address
        ip("-n", ns, "rule", "del", "to", address, "ipproto", "tcp", "dport", str(port), "lookup", CUT_TABLE)
        self._cuts.discard((host, to, port))

    # --- looking ------------------------------------------------------------------------------------

    def connections(self, host: str, to: str, ports: tuple[int, ...]) -> dict[int, int]:
        """Established TCP connections from the host to `to` on each port (read from /proc/PID/net/tcp
        of a process in that namespace: no subprocess per look)."""
        pids = namespace_pids(self.hosts[host].ns)
        counts = dict.fromkeys(ports, 0)
        if not pids:
            return counts
        target = _hex_address(self.hosts[to].address)
        try:
            lines = Path(f"/proc/{pids[0]}/net/tcp").read_text().splitlines()[1:]
        except OSError:
            return counts
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            address, _, port_hex = remote.partition(":")
            port = int(port_hex, 16)
            if state == "01" and address == target and port in counts:
                counts[port] += 1
        return counts


def namespace_pids(ns: str) -> list[int]:
    result = ip("netns", "pids", ns, check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def _hex_address(address: str) -> str:
    """An IPv4 address as /proc/net/tcp writes it (little-endian hex)."""
    return "".join(f"{int(octet):02X}" for octet in reversed(address.split(".")))
