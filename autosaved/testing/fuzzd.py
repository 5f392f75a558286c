"""A fuzz loop against a live daemon: mutated and random messages to its ZeroMQ socket and to its fd
socket (``<socket>.fd``, SOCK_SEQPACKET, msgpack requests with SCM_RIGHTS fds; see :mod:`autosaved.shm`).

What must hold: the daemon never exits; every reply is ``ok`` or carries a stable error code (never
``internal``); and the stored data of jobs the fuzzer never names (``seed-*``, written before the run)
is byte-for-byte unchanged, compared over the whole folder after the daemon stopped. When the daemon
dies, the messages sent since the last liveness check are kept as a reproducer and it is restarted.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import hashlib
import math
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from ..client.core import ClientCore
from ..client.sync import Client
from ..errors import AutosavedError
from ..offline import restore
from ..protocol import PROTOCOL_VERSION
from ..shm import fd_socket_path
from .crashsim import canon
from .private import PrivateDaemon

# A known write speed: no 32 MiB probe at every (re)start, which would dominate a run of many restarts.
CONFIG = 'write_speed = "200MiB"\n[policy]\nidle = "0.2s"\nmin_gap = "0s"\ninterval = "off"\n'


def stable_codes() -> set[str]:
    """Every error code the daemon documents (``internal`` is a bug, so it is not one of them)."""
    codes = {"bad_version", "unknown_op", "slot_unknown"}

    def walk(cls: type[AutosavedError]) -> None:
        for sub in cls.__subclasses__():
            codes.add(sub.code)
            walk(sub)

    codes.add(AutosavedError.code)
    walk(AutosavedError)
    codes.discard("internal")
    return codes


@dataclass
class FuzzReport:
    zmq_sent: int = 0
    fd_sent: int = 0
    replies: int = 0
    ok: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    bad_replies: list[str] = field(default_factory=list)
    daemon_exits: int = 0
    reproducers: list[list[Any]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return self.zmq_sent + self.fd_sent

    def summary(self) -> str:
        return (f"messages {self.sent} (zmq {self.zmq_sent}, fd socket {self.fd_sent}), replies {self.replies} "
                f"(ok {self.ok}, errors {dict(sorted(self.codes.items()))}), bad replies {len(self.bad_replies)}, "
                f"daemon exits {self.daemon_exits}, stored files changed {len(self.changed)}")


# -- message generators ----------------------------------------------------------------------------

def junk_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.45:
        return rng.choice([
            None, True, False, 0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, rng.randint(-5, 5),
            1.5, math.nan, math.inf, -math.inf, "", "x" * rng.randint(0, 40), "../../etc", "ünï", "\x00",
            b"", rng.randbytes(rng.randint(0, 16)), "update", "logged", "committed", "accepted", "fz", [], {},
        ])
    if r < 0.7:
        return [junk_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys: list[Any] = ["a", 1, "b", "x", "m", "b", "t", "l", "I", "F", "r", "kind", "dtype", "shape", "nbytes"]
    return {rng.choice(keys) if rng.random() < 0.8 else junk_key(rng): junk_value(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def _mixed_keys(value: Any) -> bool:
    """Whether a map anywhere in ``value`` has keys of more than one type (json's sort_keys fails)."""
    if isinstance(value, dict):
        if len({type(k) for k in value}) > 1:
            return True
        return any(_mixed_keys(v) for v in value.values())
    if isinstance(value, list):
        return any(_mixed_keys(v) for v in value)
    return False


def junk_key(rng: random.Random) -> Any:
    return rng.choice([None, True, 0, -1, 2**63 - 1, 2**64 - 1, -(2**63), 1.5, "", "k", "\x00", b"k", b""])


class Messages:
    """Valid requests for the fuzz jobs, then mutated ones, and pure garbage."""

    def __init__(self, rng: random.Random, destructive: bool = True) -> None:
        self.rng = rng
        # With gc and delete left out, the known mixed-key meta crasher (issue #9 defect 1) is left out too:
        # its logged record would replay into a crash at every restart and stop the loop finding anything else.
        self.known_crashers = destructive
        self.cores = [ClientCore(j) for j in ("fz", "fz2")]
        # gc and delete of the fuzz jobs race their saves (issue #9 defects 2 and 3); without them the
        # loop exercises request validation alone.
        self.maintenance = ["verify", "gc", "delete"] if destructive else ["verify"]

    def template(self) -> list[bytes]:
        rng = self.rng
        core = rng.choice(self.cores)
        kind = rng.randrange(10)
        # Request records built as the SDK builds them (each flow's first message), never sent by it here.
        if kind == 0:
            req = core.request("hello", {"session": core.session, "policy": None})
        elif kind <= 3:
            delta: dict[Any, Any] = {"n": rng.randint(0, 9), 3: (1, "t"), "arr": np.arange(rng.randint(0, 64),
                                                                                          dtype=np.float32)}
            if rng.random() < 0.3:
                delta["b"] = self.rng.randbytes(rng.randint(0, 300))
            req = core.update_request(delta, step=rng.randint(0, 100), meta={"stage": "x"},
                                      wait=rng.choice(["accepted", "accepted", "logged"]))
        elif kind == 4:
            req = core.request("save", {})
        elif kind == 5:
            req = core.request("restore", {"version": None})
        elif kind == 6:
            req = core.request("status", {"job": None} if rng.random() < 0.5 else {})
        elif kind == 7:
            req = core.request("list", {"job": rng.choice([None, core.job])})
        elif kind == 8:
            req = core.request("ping", {"job": None})
        else:
            req = core.request(rng.choice(self.maintenance), {"job": core.job} if rng.random() < 0.5 else {})
        return [bytes(memoryview(f).cast("B")) for f in req.frames]

    def mutate_header(self, frames: list[bytes]) -> list[bytes]:
        rng = self.rng
        try:
            header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        except Exception:
            return frames
        for _ in range(rng.randint(1, 3)):
            key = rng.choice([*header.keys(), "v", "op", "seq", "job", "wait", "tree", "blobs", "meta", "step",
                              "shm", "session", "boot", "acked", "owner", "policy", "version"])
            if rng.random() < 0.15:
                header.pop(key, None)
            else:
                header[key] = junk_value(rng)
                if key == "meta" and not self.known_crashers and _mixed_keys(header[key]):
                    header[key] = {"stage": header[key]} if isinstance(header[key], str) else None
        try:
            packed = msgpack.packb(header, use_bin_type=True)
        except Exception:
            return frames
        return [packed, *frames[1:]]

    def mutate_bytes(self, frames: list[bytes]) -> list[bytes]:
        rng = self.rng
        out = list(frames)
        i = rng.randrange(len(out))
        b = bytearray(out[i])
        for _ in range(rng.randint(1, 4)):
            how = rng.randrange(4)
            if how == 0 and b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif how == 1:
                del b[rng.randrange(len(b) + 1):]
            elif how == 2:
                at = rng.randrange(len(b) + 1)
                b[at:at] = self.rng.randbytes(rng.randint(1, 8))
            elif b:
                b[rng.randrange(len(b))] = rng.choice([0x00, 0xFF, 0xC0, 0xC1, 0xDC, 0xDE, 0x7F, 0x80])
        out[i] = bytes(b)
        if rng.random() < 0.1:
            out.append(self.rng.randbytes(rng.randint(0, 64)))
        if rng.random() < 0.1 and len(out) > 1:
            out.pop()
        return out

    def garbage(self) -> list[bytes]:
        rng = self.rng
        r = rng.random()
        if r < 0.3:
            return [self.rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 3))]
        if r < 0.6:
            return [msgpack.packb(junk_value(rng), use_bin_type=True)]
        header = {"v": rng.choice([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, "1", None]),
                  "op": rng.choice(["update", "save", "restore", "hello", *self.maintenance, "list", "status",
                                    "ping", "nope", 7]),
                  "seq": rng.choice([1, -1, 2**63 - 1, "1", None, 1.5]),
                  "job": rng.choice(["fz", "fz2", junk_value(rng)])}
        for _ in range(rng.randint(0, 5)):
            header[rng.choice(["tree", "blobs", "wait", "meta", "step", "shm", "session", "acked", "owner", "policy",
                               "version", "raw", "boot"])] = junk_value(rng)
        if not self.known_crashers and _mixed_keys(header.get("meta")):
            header["meta"] = None
        return [msgpack.packb(header, use_bin_type=True), *[self.rng.randbytes(rng.randint(0, 32))
                                                            for _ in range(rng.randint(0, 2))]]

    def next(self) -> list[bytes]:
        r = self.rng.random()
        if r < 0.15:
            return self.template()
        if r < 0.55:
            return self.mutate_header(self.template())
        if r < 0.8:
            return self.mutate_bytes(self.template())
        return self.garbage()


def _memfd(size: int, *, seal: bool) -> int:
    """A memfd as the SDK makes one (sealed against shrinking, so the daemon accepts it), or unsealed."""
    fd = os.memfd_create("fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def fd_message(rng: random.Random, known_slots: list[Any], known_crashers: bool = True) -> tuple[bytes, int]:
    """An fd-socket request and the size of the memfd to pass with it (0: none). Without
    ``known_crashers``, slot ids are never lists or maps (issue #9 defect 1: an unhashable slot id
    after a successful add ends the daemon)."""
    msg, fd_size = _fd_message(rng, known_slots)
    if not known_crashers:
        try:
            req = msgpack.unpackb(msg, raw=False, strict_map_key=False)
        except Exception:
            return msg, fd_size
        if isinstance(req, dict) and isinstance(req.get("slot"), list | dict):
            req["slot"] = repr(req["slot"])
            msg = msgpack.packb(req, use_bin_type=True)
    return msg, fd_size


def _fd_message(rng: random.Random, known_slots: list[Any]) -> tuple[bytes, int]:
    r = rng.random()
    if r < 0.1:
        return rng.randbytes(rng.randint(1, 40)), 0
    if r < 0.2:
        return msgpack.packb(junk_value(rng), use_bin_type=True), rng.choice([0, 0, 4096])
    slot = rng.choice([*known_slots, rng.randint(0, 5), junk_value(rng)]) if known_slots else rng.randint(0, 5)
    if r < 0.6:
        size = rng.choice([4096, 8192, 1, 0, -1, 2**40, junk_value(rng)])
        msg = {"op": "add", "slot": slot if rng.random() < 0.8 else junk_value(rng), "size": size}
        fd_size = size if isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 65536 else 4096
        return msgpack.packb(msg, use_bin_type=True), fd_size if rng.random() < 0.9 else 0
    msg = {"op": rng.choice(["drop", "drop", "nope", None]), "slot": slot if rng.random() < 0.8 else junk_value(rng)}
    return msgpack.packb(msg, use_bin_type=True), 0


# -- the loop --------------------------------------------------------------------------------------

def _tree_digest(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = "dir"
        for name in sorted(filenames):
            with open(os.path.join(dirpath, name), "rb") as fh:
                out[os.path.join(rel, name)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def seed_jobs(address: str) -> dict[str, Any]:
    """Two jobs with two versions each and records in the log past them; the expected restores."""
    expect = {}
    for job in ("seed-a", "seed-b"):
        c = Client(job, address=address, timeout=30, save_timeout=120)
        try:
            c.update({"w": np.arange(5000, dtype=np.float64), 7: ("t", 1), "bytes": b"\x00\x01"}, wait="committed")
            c.update({"w": np.ones(100, np.float32), "n": 2}, wait="committed")
            c.update({"n": 3}, wait="committed")
            expect[job] = canon(c.restore())
        finally:
            c.close()
    return expect


class FuzzRun:
    def __init__(self, root: Path, seed: int, on_progress: Callable[[FuzzReport], None] | None = None,
                 destructive: bool = True) -> None:
        self.root = root
        self.destructive = destructive
        self.rng = random.Random(seed)
        self.report = FuzzReport()
        self.codes = stable_codes()
        self.on_progress = on_progress
        self.daemon = PrivateDaemon(root, config=CONFIG, log_level="warning")
        self.recent: list[Any] = []
        # seq -> frames of recent zmq messages, to name the request behind a bad reply
        self.by_seq: dict[Any, list[bytes]] = {}

    def _check_alive(self) -> bool:
        assert self.daemon.proc is not None
        if self.daemon.proc.poll() is None:
            return True
        self.report.daemon_exits += 1
        self.report.reproducers.append(list(self.recent))
        self.daemon.start(timeout=60)
        return False

    def _judge(self, frames: list[bytes]) -> None:
        self.report.replies += 1
        try:
            header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        except Exception as exc:
            self.report.bad_replies.append(f"undecodable reply: {exc}")
            return
        if header.get("ok") is True:
            self.report.ok += 1
            return
        code = str(header.get("code"))
        self.report.codes[code] = self.report.codes.get(code, 0) + 1
        if code not in self.codes:
            seq = header.get("seq")
            cause = self.by_seq.get(seq) if isinstance(seq, int | str | None) else None
            self.report.bad_replies.append(f"code {code!r}: {str(header.get('message'))[:200]!r} "
                                           f"<- request {cause!r:.600}")

    def zmq_burst(self, n: int, gen: Messages) -> None:
        ctx: Any = zmq.Context.instance()
        sock: Any = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 5000)
        sock.connect(self.daemon.address)
        outstanding = 0
        try:
            for _ in range(n):
                frames = gen.next()
                self.recent.append(("zmq", frames))
                self.recent = self.recent[-64:]
                try:
                    head = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
                    seq = head.get("seq") if isinstance(head, dict) else None
                    if isinstance(seq, int | str | None):
                        self.by_seq[seq] = frames
                        if len(self.by_seq) > 256:
                            self.by_seq.pop(next(iter(self.by_seq)))
                except Exception:
                    pass
                try:
                    sock.send_multipart(frames)
                except zmq.Again:
                    break
                self.report.zmq_sent += 1
                outstanding += 1
                while outstanding > 16 or sock.poll(0):
                    if not sock.poll(2000):
                        outstanding = 0  # garbage gets no reply; stop waiting for it
                        break
                    self._judge(sock.recv_multipart())
                    outstanding -= 1
            deadline = time.monotonic() + 3
            while outstanding > 0 and time.monotonic() < deadline:
                if sock.poll(200):
                    self._judge(sock.recv_multipart())
                    outstanding -= 1
        finally:
            sock.close(0)

    def fd_burst(self, n: int) -> None:
        path = fd_socket_path(self.daemon.address)
        assert path is not None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(5)
        try:
            s.connect(path)
            s.recv(4096)  # the daemon's hello (token)
        except OSError:
            s.close()
            return
        slots: list[Any] = []
        try:
            for _ in range(n):
                msg, fd_size = fd_message(self.rng, slots, self.destructive)
                self.recent.append(("fd", msg, fd_size))
                self.recent = self.recent[-64:]
                fds: list[int] = []
                if fd_size:
                    fds.append(_memfd(fd_size, seal=self.rng.random() < 0.7))
                try:
                    if fds:
                        s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    else:
                        s.send(msg)
                    self.report.fd_sent += 1
                    reply = s.recv(4096)
                finally:
                    for fd in fds:
                        os.close(fd)
                if not reply:
                    break
                self.report.replies += 1
                try:
                    rep = msgpack.unpackb(reply, raw=False, strict_map_key=False)
                except Exception:
                    rep = None
                if not isinstance(rep, dict) or not isinstance(rep.get("ok"), bool):
                    self.report.bad_replies.append(f"fd reply {reply[:80]!r}")
                elif rep["ok"]:
                    self.report.ok += 1
                    with contextlib.suppress(Exception):
                        slots.append(msgpack.unpackb(msg, raw=False, strict_map_key=False).get("slot"))
                else:
                    self.report.codes["fd-refused"] = self.report.codes.get("fd-refused", 0) + 1
        except OSError:
            pass  # the daemon closed the connection (allowed) or died (found by the liveness check)
        finally:
            s.close()

    def run(self, messages: int, *, known: list[tuple[str, Any]] | None = None) -> FuzzReport:
        """Seed, snapshot, fuzz ``messages`` messages (``known`` reproducers first), stop, compare."""
        d = self.daemon
        d.start(timeout=60)
        try:
            expect = seed_jobs(d.address)
            d.stop(signal.SIGTERM)
            jobs_dir = d.state_dir / "jobs" / str(os.geteuid())
            before = {job: _tree_digest(jobs_dir / job) for job in expect}
            d.start(timeout=60)
            for kind, payload in known or []:
                self.recent.append((kind, payload))
                if kind == "zmq":
                    self._send_known_zmq(payload)
                else:
                    self._send_known_fd(payload)
                time.sleep(0.5)
                self._check_alive()
            gen = Messages(self.rng, self.destructive)
            bursts = 0
            while self.report.sent < messages:
                burst = min(500, messages - self.report.sent)
                bursts += 1
                if bursts % 3:  # two zmq bursts of 500, then 100 messages on a new fd-socket connection
                    self.zmq_burst(burst, gen)
                else:
                    self.fd_burst(min(burst, 100))
                self._check_alive()
                if self.on_progress is not None:
                    self.on_progress(self.report)
            rc = d.stop(signal.SIGTERM)
            if rc != 0:
                self.report.daemon_exits += 1
                self.report.bad_replies.append(f"exit code {rc} on SIGTERM")
            for job, digest in before.items():
                after = _tree_digest(jobs_dir / job)
                self.report.changed += [f"{job}/{p}" for p in sorted(set(digest) | set(after))
                                        if digest.get(p) != after.get(p)]
                got = restore(job, state_dir=d.state_dir)
                if canon(got) != expect[job]:
                    self.report.changed.append(f"{job}: restore differs from what was stored")
        finally:
            d.cleanup()
        return self.report

    def _send_known_zmq(self, frames: list[bytes]) -> None:
        sock: Any = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.daemon.address)
        try:
            sock.send_multipart(frames)
            self.report.zmq_sent += 1
            if sock.poll(5000):
                self._judge(sock.recv_multipart())
        finally:
            sock.close(0)

    def _send_known_fd(self, requests: list[tuple[dict[str, Any], int]]) -> None:
        path = fd_socket_path(self.daemon.address)
        assert path is not None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(5)
        try:
            s.connect(path)
            s.recv(4096)
            for msg, fd_size in requests:
                fds = []
                if fd_size:
                    fds.append(_memfd(fd_size, seal=True))
                data = msgpack.packb(msg, use_bin_type=True)
                if fds:
                    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    s.send(data)
                for fd in fds:
                    os.close(fd)
                self.report.fd_sent += 1
                if s.recv(4096):
                    self.report.replies += 1
        except OSError:
            pass
        finally:
            s.close()


def known_crashers() -> list[tuple[str, Any]]:
    """The reproducers of issue #9 defect 1 that a message can trigger (EMFILE needs a ulimit)."""
    core = ClientCore("fz-known")
    meta = core.update_request({"n": 1}, step=None, meta={"x": {1: 0, "a": 0}}, wait="logged")
    save = core.request("save", {})
    frames = [[bytes(memoryview(f).cast("B")) for f in r.frames] for r in (meta, save)]
    return [("zmq", frames[0]), ("zmq", frames[1]),
            ("fd", [({"op": "add", "slot": 1, "size": 4096}, 4096), ({"op": "drop", "slot": [1]}, 0)])]
