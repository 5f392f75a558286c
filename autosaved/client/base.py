"""What the sync and async drivers share besides the protocol core: address checks, error texts,
socket options, and the result types."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import zmq

from ..config import discover_address
from ..errors import DaemonUnavailable, QuotaExceeded
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


def timed_out(address: str, op: str, timeout: float) -> DaemonUnavailable | QuotaExceeded:
    path = address.removeprefix("ipc://") if address.startswith("ipc://") else None
    if path is not None and os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        # The daemon's connection guard closes the socket file to a user over quota.max_connections (an ACL)
        # and shuts the new connection: the request in it was lost, and this names the bound instead of a
        # hang. (Telling it at once needs a monitor socket per client: tried, it tripled each client's
        # ZeroMQ sockets and broke the requests a DEALER still delivers after a daemon restart.)
        return QuotaExceeded(
            f"the autosaved daemon at {address} did not answer {op!r} within {timeout:g}s and its socket file is "
            "closed to this user: this user has quota.max_connections connections open to it (or the daemon is "
            "at its max_connections), or its clients sent requests far past quota.max_requests for a second, so "
            "the connection was refused or cut and the request lost (it is never resent). Close some of this "
            "user's clients, wait for replies before sending more, or ask the operator to raise the quota.",
            details={"address": address, "op": op, "timeout": timeout, "bound": "quota.max_connections"},
        )
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
