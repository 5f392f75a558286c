"""A real network partition between a host and the object store: the daemon runs in a network namespace
of its own (``ip netns``, root only), reaching the store over a veth pair; taking the link down drops every
packet (no RST, no error: requests hang until they time out), as a partitioned host sees it.

The S3 server listens on 127.0.0.1 in the test's namespace, so a small TCP relay on the host end of the
veth pair forwards to it; the relay is on the store's side of the cut.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import autosaved
from autosaved.testing.private import PrivateDaemon
from tests.conftest import skip_or_fail, wait_for
from tests.test_replication import JOB, _bucket_ids, _job_status


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class Relay:
    """TCP from ``host:port`` (an ephemeral port) to ``127.0.0.1:target``, one thread per direction."""

    def __init__(self, host: str, target: int) -> None:
        self.target = target
        self.server = socket.create_server((host, 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
                upstream.settimeout(None)
            except OSError:
                return
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()


class Netns:
    """A namespace joined to this one by a veth pair: ``outside`` here, ``inside`` in the namespace."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"as-part-{tag}"
        self.host_if, self.ns_if = f"asp{tag}h", f"asp{tag}n"
        octet = int(tag[:2], 16) % 250 + 1
        self.outside, self.inside = f"10.254.{octet}.1", f"10.254.{octet}.2"

    def create(self) -> None:
        steps = [("netns", "add", self.name),
                 ("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.name),
                 ("addr", "add", f"{self.outside}/30", "dev", self.host_if),
                 ("link", "set", self.host_if, "up"),
                 ("-n", self.name, "addr", "add", f"{self.inside}/30", "dev", self.ns_if),
                 ("-n", self.name, "link", "set", self.ns_if, "up"),
                 ("-n", self.name, "link", "set", "lo", "up")]
        for step in steps:
            out = _ip(*step)
            if out.returncode != 0:
                raise OSError(f"ip {' '.join(step)}: {out.stderr.strip()}")

    def partition(self, cut: bool) -> None:
        out = _ip("link", "set", self.host_if, "down" if cut else "up")
        assert out.returncode == 0, out.stderr

    def delete(self) -> None:
        _ip("link", "del", self.host_if)  # also removes its peer
        _ip("netns", "del", self.name)


@pytest.fixture
def netns() -> Iterator[Netns]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        skip_or_fail("a network partition needs root and iproute2 (ip netns)")
    ns = Netns()
    try:
        ns.create()
    except OSError as exc:
        ns.delete()
        skip_or_fail(f"ip netns is unavailable here: {exc}")
    try:
        yield ns
    finally:
        ns.delete()


def _daemon_in_netns(s3server: Any, netns: Netns, make_daemon: Callable[..., PrivateDaemon],
                     monkeypatch: pytest.MonkeyPatch, prefix: str, head: str,
                     remote: str) -> tuple[PrivateDaemon, Relay]:
    """A daemon (config ``head`` + ``[remote]`` with ``remote``) inside ``netns``, reaching the store on
    the host only through a relay on the veth pair's outside address: the link is its one way out."""
    for k, v in s3server.env.items():
        monkeypatch.setenv(k, v)
    relay = Relay(netns.outside, int(s3server.endpoint.rsplit(":", 1)[1]))
    config = (head + f'[remote]\nurl = "{s3server.url(prefix)}"\n'
              f'endpoint = "http://{netns.outside}:{relay.port}"\n' + remote)
    d = make_daemon(config, start=False)
    d.command_prefix = ["ip", "netns", "exec", netns.name]
    d.start()
    return d, relay


def test_partitioned_host_saves_locally_then_catches_up_in_order(
        s3server: Any, netns: Netns, make_daemon: Callable[..., PrivateDaemon],
        monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"partition-{secrets.token_hex(3)}"
    d, relay = _daemon_in_netns(
        s3server, netns, make_daemon, monkeypatch, prefix,
        'chunk_size = "64KiB"\n[policy]\nidle = "0.2s"\nmin_gap = "0s"\ninterval = "off"\nkeep_last = 1\n',
        'timeout = "2s"\nkeep_last = 50\n')
    try:
        with autosaved.Client(JOB, address=d.address, save_timeout=60) as c:
            v0 = c.update({"v": 0}, wait="replicated").version
            netns.partition(cut=True)
            try:
                # Local saves go on; a replicated ack never comes while the host is cut off.
                backlog = [c.update({"v": i, "blob": np.full(20_000, i)}, wait="committed").version
                           for i in (1, 2, 3)]
                c.save_timeout = 3
                with pytest.raises(autosaved.DaemonUnavailable):
                    c.update({"v": 4}, wait="replicated")
                c.save_timeout = 60
                st = wait_for(lambda: (r := _job_status(d)["remote"])["last_error"] and r, timeout=60)
                assert st["replicated_version"] == v0  # type: ignore[index]
                assert st["backlog_versions"] >= 3 and st["backlog_bytes"] > 0  # type: ignore[index]
                assert _bucket_ids(s3server, prefix) == [v0]
            finally:
                netns.partition(cut=False)
            last = c.update({"v": 5}, wait="replicated").version
            assert last is not None
            st = _job_status(d)["remote"]
            assert st["replicated_version"] == last and st["backlog_versions"] == 0
        ids = _bucket_ids(s3server, prefix)
        assert ids == list(range(v0, last + 1)) and set(backlog) <= set(ids)  # in order, nothing skipped
        assert autosaved.restore(JOB, remote=s3server.url(prefix), version=backlog[1])["v"] == 2
    finally:
        d.kill()
        relay.close()


def test_upload_throttle_backs_off_on_real_retransmissions(
        s3server: Any, netns: Netns, make_daemon: Callable[..., PrivateDaemon],
        monkeypatch: pytest.MonkeyPatch, figure: Callable[[str], None]) -> None:
    """The adaptive upload rate on a real congested link: a token-bucket shaper (``tc tbf``, a shallow
    queue) on the daemon's end of the link drops what exceeds it, TCP retransmits, and the daemon (reading
    its own namespace's /proc/net/snmp) halves its upload rate. Direction within one run, not speed: the
    same upload over the unshaped link leaves the rate unlimited."""
    prefix = f"shaped-{secrets.token_hex(3)}"
    d, relay = _daemon_in_netns(
        s3server, netns, make_daemon, monkeypatch, prefix,
        'chunk_size = "1MiB"\n[policy]\nidle = "off"\nmin_gap = "0s"\ninterval = "off"\n', 'timeout = "10s"\n')

    def pace() -> dict[str, Any]:
        with autosaved.Admin(address=d.address, timeout=30) as admin:
            return admin.status()["daemon"]["remote"]["upload_throttle"]  # type: ignore[no-any-return]

    try:
        with autosaved.Client(JOB, address=d.address, save_timeout=120) as c:
            c.update({"a": np.random.default_rng(1).random(2_000_000)}, wait="replicated")  # 16 MB, unshaped
            assert pace()["allowed_rate"] is None and pace()["interfaces"] == [netns.ns_if]
            shaped = subprocess.run(["tc", "-n", netns.name, "qdisc", "add", "dev", netns.ns_if, "root", "tbf",
                                     "rate", "40mbit", "burst", "32kb", "latency", "5ms"],
                                    capture_output=True, text=True, timeout=30)
            if shaped.returncode != 0:
                skip_or_fail(f"tc tbf is unavailable here: {shaped.stderr.strip()}")
            c.update({"a": np.random.default_rng(2).random(2_000_000)}, wait="replicated")  # 16 MB, shaped
            seen = pace()
            # It backed off (and is still recovering, 4 MiB/s per second, far below "unlimited").
            assert seen["allowed_rate"] is not None and seen["allowed_rate"] < 256 << 20, seen
            figure(f"upload over a 40 Mbit/s shaper: allowed rate {seen['allowed_rate'] / 2**20:.1f} MiB/s after, "
                   f"held back {seen['throttled_s']:.2f}s; unshaped: unlimited")
    finally:
        d.kill()
        relay.close()
