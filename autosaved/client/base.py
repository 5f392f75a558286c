"""What the sync and async drivers share besides the protocol core: address checks, error texts,
socket options, and the result types."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import zmq

from ..config import discover_address
from ..errors import AutosavedError, DaemonUnavailable, Forbidden, QuotaExceeded
from ..protocol import PROTOCOL_VERSION, pack_header, unpack_header

DEFAULT_TIMEOUT = 10.0
DEFAULT_SAVE_TIMEOUT = 600.0
C = TypeVar("C", bound=type)


class _Conn(Protocol):
    address: str
    timeout: float
    save_timeout: float


class _Job(Protocol):
    job: str


class JobFacade:
    """The settings both job clients (:class:`~autosaved.Client`, :class:`~autosaved.AsyncClient`) expose,
    read from their core and connection: the facades themselves only drive flows."""

    _core: _Job
    _conn: _Conn

    @property
    def job(self) -> str:
        return self._core.job

    @property
    def address(self) -> str:
        return self._conn.address

    @property
    def timeout(self) -> float:
        """Seconds an ordinary request may take."""
        return self._conn.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._conn.timeout = value

    @property
    def save_timeout(self) -> float:
        """Seconds a request that may wait for a save (``protocol.is_long``) may take."""
        return self._conn.save_timeout

    @save_timeout.setter
    def save_timeout(self, value: float) -> None:
        self._conn.save_timeout = value


def same_docs_as(blocking: type) -> Callable[[C], C]:
    """Give an async facade the docstrings of its blocking twin, method by method: written once, on the
    blocking class (tests/test_public_api.py checks the two have the same methods and signatures)."""
    def copy(cls: C) -> C:
        if cls.__doc__ is None:
            cls.__doc__ = blocking.__doc__
        for name, member in vars(cls).items():
            twin = getattr(blocking, name, None)
            if inspect.isfunction(member) and member.__doc__ is None and twin is not None:
                member.__doc__ = twin.__doc__
        return cls
    return copy


@dataclass(frozen=True)
class Ack:
    """How far an update got: ``level`` is ``accepted`` (in daemon memory), ``logged``, ``committed`` (inside
    the committed version ``version``) or ``replicated`` (inside ``version``, whose manifest is in the object
    store)."""

    level: str
    seq: int
    version: int | None = None


def resolve_address(address: str | None) -> str:
    return address or discover_address()


def _how_to_start(address: str) -> str:
    return (f"Start it with `autosaved serve --address {address}` (or `systemctl start autosaved` on a host "
            "that runs it as a service), or point AUTOSAVED_ADDRESS at a running daemon.")


def check_reachable(address: str) -> None:
    """Fail fast, with a useful message, when an ipc socket file is not there at all."""
    if address.startswith("ipc://"):
        path = address.removeprefix("ipc://")
        if not os.path.exists(path):
            raise DaemonUnavailable(
                f"no autosaved daemon at {address} (the socket file does not exist). {_how_to_start(address)}",
                details={"address": address},
            )


def timed_out(address: str, op: str, timeout: float) -> DaemonUnavailable:
    return DaemonUnavailable(
        f"the autosaved daemon at {address} did not answer {op!r} within {timeout:g}s; it may be stopped, "
        f"hung or overloaded. {_how_to_start(address)}",
        details={"address": address, "op": op, "timeout": timeout},
    )


def configure(sock: Any, address: str) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    sock.connect(address)


_monitors = itertools.count()
# How long the socket file may stay closed to this user while connects fail before a request gives up: the
# guard reopens it within milliseconds of one of the user's connections closing (a client started right
# after its user's others exited must not be refused for that lag).
DENIED_GRACE_S = 1.0
_ACL_XATTR = "system.posix_acl_access"


def file_refusal(path: str) -> str | None:
    """Why the daemon's socket file at ``path`` keeps this process out, or ``None``: the connection guard
    closes it to a user over ``quota.max_connections`` (an ACL entry ``user:UID:---``) and to everyone at
    the listener's cap (mode 0), see daemon/connguard.py. Root is never kept out by the file."""
    uid = os.geteuid()
    try:
        if uid == 0 or os.access(path, os.R_OK | os.W_OK):
            return None
        if os.stat(path).st_mode & 0o777 == 0:
            return "the daemon is at its max_connections (all users' connections together)"
        with contextlib.suppress(OSError):
            acl = os.getxattr(path, _ACL_XATTR)
            for off in range(4, len(acl) - 7, 8):
                tag, perm, ident = struct.unpack_from("<HHI", acl, off)
                if tag == 0x02 and ident == uid and perm == 0:
                    return f"this user (uid {uid}) has quota.max_connections connections open to the daemon"
    except OSError:
        return None
    return f"this user (uid {uid}) may not open the socket file (not in the daemon's socket_group?)"


class LinkWatch:
    """Tells a request that it cannot be answered: the connection it went into closed before its reply,
    or the daemon keeps this user out (issue 19).

    A DEALER writes a request into its live connection (or keeps it queued until one is up) and, when that
    connection closes, reconnects without resending it: the daemon's connection guard shuts down a
    connection over ``quota.max_connections``, and a daemon that dies mid-request leaves its request
    unanswered for ever, so the client waited out its whole timeout. libzmq's monitor reports each closed
    connection (``EVENT_DISCONNECTED``) and each failed connect (``EVENT_CLOSED``), nothing on a healthy
    link, and the drivers wait on its fd beside the DEALER's in the same poll. :meth:`begin`, just before a
    request is sent, forgets what was seen so far: a request sent while no connection exists is sent when
    the daemon comes up, and is only lost if *that* connection closes. Nothing is ever resent: the daemon
    does not dedupe updates. Per request on a healthy link this costs one ``ZMQ_EVENTS`` read of the
    monitor. Create it before the DEALER connects, so that nothing escapes it."""

    def __init__(self, ctx: zmq.Context[Any], sock: zmq.Socket[Any], address: str) -> None:
        addr = f"inproc://autosaved.client.link.{os.getpid()}.{next(_monitors)}"
        sock.monitor(addr, zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        self.mon: zmq.Socket[Any] = ctx.socket(zmq.PAIR)
        self.mon.setsockopt(zmq.LINGER, 0)
        self.mon.connect(addr)
        # Readable whenever the monitor has news (ZeroMQ's FD: "look at EVENTS again"); polled as a plain fd,
        # so a wait costs no extra ZMQ_EVENTS read.
        self.fd: int = self.mon.FD
        self.address = address
        self.path = address.removeprefix("ipc://") if address.startswith("ipc://") else None
        self._denied_since: float | None = None

    def begin(self) -> None:
        """A request is about to be sent: what was seen until now happened before it."""
        self._denied_since = None
        events = self.mon.getsockopt(zmq.EVENTS)
        if isinstance(events, int) and events & zmq.POLLIN:
            self._read()

    def lost(self) -> bool:
        """Whether the request cannot be answered, by what the monitor reported since :meth:`begin` (call it
        when the monitor's fd was readable): a connection closed, or connects keep failing on a socket file
        closed to this user (for :data:`DENIED_GRACE_S`)."""
        closes, failed = self._read()
        if closes:
            return True
        if failed and self.path is not None:
            if file_refusal(self.path) is None:
                self._denied_since = None
            elif self._denied_since is None:
                self._denied_since = time.monotonic()
            else:
                return time.monotonic() - self._denied_since >= DENIED_GRACE_S
        return False

    def _read(self) -> tuple[int, int]:
        closes = failed = 0
        while True:
            try:
                frames = self.mon.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:  # Again: all read
                return closes, failed
            event = int.from_bytes(frames[0][:2], "little") if frames and len(frames[0]) >= 2 else 0
            closes += event == zmq.EVENT_DISCONNECTED
            failed += event == zmq.EVENT_CLOSED

    def close(self) -> None:
        self.mon.close(0)

    def error(self, op: str) -> AutosavedError:
        """The error for a request that cannot be answered (see :meth:`lost`)."""
        return closed_early(self.address, op, self.path)


def closed_early(address: str, op: str, path: str | None) -> AutosavedError:
    """The error for a request whose connection closed before its reply, or that the daemon keeps out. The
    guard closes the socket file to a user before it shuts down that user's connection, so the file tells
    a refusal from a stop or restart."""
    details = {"address": address, "op": op, "bound": "quota.max_connections"}
    unknown = (f"{op!r} was not answered and may or may not have been applied (it is never resent; send it "
               "again if it must be)")
    why = file_refusal(path) if path is not None else None
    if why is not None and "socket_group" in why:
        return Forbidden(f"the autosaved daemon at {address} refused this connection: {why}; {unknown}.",
                         details=details)
    if why is not None:
        return QuotaExceeded(
            f"the autosaved daemon at {address} refused this connection: {why}; {unknown}. Close some of this "
            "user's clients (each open Client holds one connection) or ask the operator to raise "
            "quota.max_connections.", details=details)
    return DaemonUnavailable(
        f"the autosaved daemon at {address} closed the connection before answering: it stopped or restarted, "
        f"or refused the connection (this user over quota.max_connections), or dropped it (a frame over its "
        f"max_message_bytes); {unknown}. {_how_to_start(address)}",
        details=details)


# A long op (hello may wait for a job's replay, save for a commit) is waited for up to the save timeout. On a
# socket that has not heard from the daemon yet, a ping bounded by the ordinary timeout comes first: a DEALER
# queues a request even with nobody behind a stale socket file, and a hello to a SIGKILLed daemon must fail
# within ``timeout``, not ``save_timeout`` (it hung a test for 600 s). ZMQ_IMMEDIATE would bound the send
# instead, but its blocking send missed reconnections after a refused connection (the connection-cap test).
PROBE_SEQ = 0


def probe_frames() -> list[bytes]:
    return [pack_header({"v": PROTOCOL_VERSION, "op": "ping", "seq": PROBE_SEQ, "job": None})]


def is_probe_reply(frames: list[memoryview]) -> bool:
    try:
        return unpack_header(frames[0]).get("seq") == PROBE_SEQ
    except Exception:
        return False


def ack_from(header: dict[str, Any], seq: int) -> Ack:
    return Ack(level=str(header.get("ack")), seq=seq, version=header.get("version"))
