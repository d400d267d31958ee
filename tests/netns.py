"""Other hosts on this machine: Linux network namespaces joined to it by virtual ethernet links.

A `Host` is one network namespace with a veth pair: this machine's end gets the first
address of a /30 out of 10.213.0.0/16, the namespace's end the second, the namespace's
loopback is brought up, and there is no other route, so what runs inside reaches this
machine only through that link, with an address of its own, as a worker on another
computer would. `Host.command` wraps a command so that it also runs in a mount
namespace of its own where the given folders (the server's storage, the test's files) are
hidden under empty tmpfs mounts, with a hostname of its own and a working folder of its own
(a private tmpfs on WORKDIR): the code and the Python environment stay visible (software
installed on that host, wherever the checkout is, /tmp included), the server's files do not.

`Host.reach_only(address, ports)` narrows what a host reaches to a few TCP ports of one of this
machine's addresses (a firewall in the namespace), routed through its link.

`hosts(count)` makes them and always takes them down again, killing every process still
inside. Where this machine cannot make them (not root, no CAP_NET_ADMIN, no `ip`, no
`unshare`, a sandbox that refuses a step) it raises `Unavailable` with the command and
its error text, for the test to skip with that reason.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

NETWORK = ipaddress.ip_network("10.213.0.0/16")  # private, and unlikely to be one this machine routes already
# A process's working folder and HOME: each host mounts a private tmpfs on this one empty
# folder, so hosts never see each other's files there. Not under /tmp, where a checkout may be.
WORKDIR = "/var/tmp/karaoke-netns-work"


class Unavailable(Exception):
    """This machine cannot make network namespaces; the message says which step failed and why."""


def _run(argv: Sequence[str], timeout: float = 20) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except OSError as exc:
        raise Unavailable(f"`{shlex.join(argv)}`: {exc}") from None
    if done.returncode != 0:
        raise Unavailable(f"`{shlex.join(argv)}` failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _subnets_in_use() -> set[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            used.add(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return used


def _free_subnets(count: int, seed: int) -> list[ipaddress.IPv4Network]:
    """`count` /30s of NETWORK that no interface here uses, starting at one derived from `seed`
    (the pid), so that two runs at once pick different ones."""
    blocks = list(NETWORK.subnets(new_prefix=30))
    used = _subnets_in_use()
    chosen: list[ipaddress.IPv4Network] = []
    for offset in range(len(blocks)):
        block = blocks[(seed * 7 + offset) % len(blocks)]
        if not any(block.overlaps(u) for u in used):
            chosen.append(block)
            if len(chosen) == count:
                return chosen
    raise Unavailable(f"no free /30 left in {NETWORK}")


@dataclass(frozen=True)
class Host:
    netns: str  # the network namespace's name
    link: str  # this machine's end of the veth pair
    hostname: str
    host_address: str  # this machine's address on the link
    address: str  # the namespace's address on the link

    def command(self, argv: Sequence[str], hide: Sequence[Path] = ()) -> list[str]:
        """`argv` as a process on this host: its network namespace, a mount namespace where every
        folder of `hide` is an empty tmpfs, its own hostname, and a private tmpfs on WORKDIR as its
        working folder."""
        # Deeper folders first: one inside another must be covered before its parent is.
        covered = [str(p) for p in sorted({Path(p) for p in hide}, key=lambda p: -len(p.parts)) if Path(p).is_dir()]
        os.makedirs(WORKDIR, exist_ok=True)  # the mount point; what each host writes stays in its own tmpfs
        script = "; ".join([
            "set -e",
            *(f"mount -t tmpfs -o size=1m,mode=0755 hidden {shlex.quote(p)}" for p in covered),
            f"mount -t tmpfs -o mode=0700 work {WORKDIR}",
            f"hostname {shlex.quote(self.hostname)}",
            f"cd {WORKDIR}",
            'exec "$@"',
        ])
        # `ip netns exec` and `unshare` (without --fork) exec what follows, and so does the shell:
        # the process started is the command itself, with its pid.
        return ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", script, "host-launcher", *argv]

    def reach_only(self, address: str, ports: Sequence[int]) -> None:
        """Let what runs on this host open TCP connections to `address` (one of this machine's) on
        `ports`, and to nothing else but its own loopback: a route to that address through the link
        (where it is not the link's own), and a firewall in the namespace's OUTPUT chain that
        rejects every other connection, as a firewall between the hosts would. Unavailable where
        `iptables` is missing or refused."""
        ns = ["ip", "netns", "exec", self.netns]
        if address != self.host_address:
            _run([*ns, "ip", "route", "replace", f"{address}/32", "via", self.host_address])
        rules = [["-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"],
                 *(["-A", "OUTPUT", "-p", "tcp", "-d", address, "--dport", str(port), "-j", "ACCEPT"]
                   for port in ports),
                 # a reset, not a drop: a refused connection fails at once instead of timing out
                 ["-A", "OUTPUT", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
                 ["-A", "OUTPUT", "-j", "REJECT"]]
        for rule in rules:
            _run([*ns, "iptables", *rule])

    def pids(self) -> list[int]:
        """Every process in this host's network namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=10).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        """Kill what still runs inside (all of it was started by the test that made the host)."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)  # a stopped process dies only once continued
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)


def _check_tools() -> None:
    for tool in ("ip", "unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            raise Unavailable(f"`{tool}` is not installed")
    if os.geteuid() != 0:
        raise Unavailable(f"not root (euid {os.geteuid()}): making network namespaces needs CAP_NET_ADMIN")


def _make(host: Host, subnet: ipaddress.IPv4Network) -> None:
    prefix = subnet.prefixlen
    _run(["ip", "netns", "add", host.netns])
    inside = host.link[:-1] + "n"
    _run(["ip", "link", "add", host.link, "type", "veth", "peer", "name", inside])
    _run(["ip", "link", "set", inside, "netns", host.netns])
    _run(["ip", "addr", "add", f"{host.host_address}/{prefix}", "dev", host.link])
    _run(["ip", "link", "set", host.link, "up"])
    ns = ["ip", "netns", "exec", host.netns]
    _run([*ns, "ip", "addr", "add", f"{host.address}/{prefix}", "dev", inside])
    _run([*ns, "ip", "link", "set", inside, "up"])
    _run([*ns, "ip", "link", "set", "lo", "up"])


def _take_down(host: Host) -> None:
    host.kill_all()
    # Deleting one end of a veth pair deletes both; the namespace goes once nothing is inside.
    subprocess.run(["ip", "link", "del", host.link], capture_output=True, timeout=10)
    subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=10)


@contextmanager
def hosts(count: int, tag: str = "kw") -> Iterator[list[Host]]:
    """`count` hosts, named after this process's pid (two runs never share a name), taken down afterwards.

    Unavailable (with the reason) where a step is refused, after undoing what was made."""
    _check_tools()
    made: list[Host] = []
    try:
        for index, subnet in enumerate(_free_subnets(count, os.getpid())):
            first, second = list(subnet.hosts())
            name = f"{tag}{os.getpid()}{chr(ord('a') + index)}"  # veth names: at most 15 characters
            host = Host(netns=name, link=f"{name}h", hostname=f"{name}-host", host_address=str(first),
                        address=str(second))
            made.append(host)
            _make(host, subnet)
        # The launcher itself (mount and UTS namespaces, tmpfs) may be refused where the network part was not.
        _run(made[0].command(["true"]))
        yield made
    finally:
        for host in made:
            _take_down(host)


def accepts(address: str, port: int, timeout: float = 2.0) -> bool:
    """Whether something answers TCP on address:port from this machine."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False
