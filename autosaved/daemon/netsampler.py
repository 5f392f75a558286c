"""Reading the network counters the upload throttle needs (see :func:`autosaved.throttle.measure_net`).

Which interfaces reach the store: the IPv4 route to its endpoint's address (``/proc/net/route``, longest
prefix), ``lo`` for a loopback address, every interface but ``lo`` when the route cannot be told (IPv6, an
unresolvable name). Their sent bytes come from ``/proc/net/dev``, their capacity from
``/sys/class/net/<if>/speed`` (virtual NICs report none), retransmissions from ``/proc/net/snmp``. Every
reader degrades to ``None`` instead of failing. The parsers are pure functions of the files' text.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from ..throttle import NetSample

SYS = Path("/sys")
PROC = Path("/proc")


def route_interfaces(address: str | None, route_text: str) -> list[str] | None:
    """The interface the kernel's IPv4 table routes ``address`` through (``/proc/net/route`` text):
    ``["lo"]`` for loopback; ``None`` when it cannot be told (then the caller counts every interface)."""
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.is_loopback:
        return ["lo"]
    if ip.version != 4:
        return None
    dest = int(ip)
    best: tuple[int, str] | None = None
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            # The kernel prints each network-order address as a host-order (little-endian) hex word.
            net = int.from_bytes(bytes.fromhex(fields[1]), "little")
            mask = int.from_bytes(bytes.fromhex(fields[7]), "little")
        except ValueError:
            continue
        if dest & mask == net & mask:
            prefix = bin(mask).count("1")
            if best is None or prefix > best[0]:
                best = (prefix, fields[0])
    return [best[1]] if best is not None else None


def parse_net_dev(text: str) -> dict[str, int]:
    """Interface → bytes transmitted, from ``/proc/net/dev`` text."""
    out: dict[str, int] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and len(fields) >= 9:
            with contextlib.suppress(ValueError):
                out[name.strip()] = int(fields[8])
    return out


def parse_tcp_snmp(text: str) -> tuple[int, int] | None:
    """(OutSegs, RetransSegs) from ``/proc/net/snmp`` text, or ``None``."""
    rows = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
    if len(rows) < 2:
        return None
    table = dict(zip(rows[0][1:], rows[1][1:], strict=False))
    try:
        return int(table["OutSegs"]), int(table["RetransSegs"])
    except (KeyError, ValueError):
        return None


def endpoint_address(endpoint: str | None) -> str | None:
    """The store endpoint's IP address (resolved once; blocking DNS, so call it from a worker thread).
    No endpoint means AWS itself: its addresses vary, so ``None`` (every interface counts)."""
    host = urlparse(endpoint).hostname if endpoint else None
    if not host:
        return None
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, IndexError):
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


class NetSampler:
    def __init__(self, address: str | None, own_bytes: Callable[[], int], clock: Callable[[], float],
                 proc_root: Path = PROC, sys_root: Path = SYS) -> None:
        self.proc = proc_root
        self.sys = sys_root
        self.own_bytes = own_bytes
        self.clock = clock
        chosen = route_interfaces(address, _read(proc_root / "net" / "route") or "")
        if chosen is None:
            chosen = [n for n in parse_net_dev(_read(proc_root / "net" / "dev") or "") if n != "lo"]
        self.interfaces = chosen

    def link_bps(self) -> float | None:
        total = 0.0
        for name in self.interfaces:
            text = _read(self.sys / "class" / "net" / name / "speed")
            try:
                mbps = int((text or "").strip())
            except ValueError:
                return None
            if mbps <= 0:
                return None  # -1: the NIC does not know (virtual NICs, most clouds)
            total += mbps * 1_000_000 / 8
        return total or None

    def sample(self) -> NetSample:
        dev = parse_net_dev(_read(self.proc / "net" / "dev") or "")
        tx = sum(dev[n] for n in self.interfaces) if self.interfaces and all(n in dev for n in self.interfaces) \
            else None
        tcp = parse_tcp_snmp(_read(self.proc / "net" / "snmp") or "")
        return NetSample(at=self.clock(), tx_bytes=tx, own_bytes=self.own_bytes(), link_bps=self.link_bps(),
                         out_segs=tcp[0] if tcp else None, retrans_segs=tcp[1] if tcp else None)
