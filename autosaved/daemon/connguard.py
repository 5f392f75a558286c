"""Caps on the ZeroMQ socket's connections, per user and in all (issue 19, defect 1).

libzmq accepts ipc connections by itself, in its I/O thread, and aborts the process when ``accept()``
fails with ``EMFILE``; it has no option that caps connections. So the daemon watches its ROUTER's
monitor events (``ZMQ_EVENT_ACCEPTED`` and ``ZMQ_EVENT_DISCONNECTED``, whose value is the connection's
fd), tells each connection's user from ``SO_PEERCRED`` on that fd, and refuses what is over a cap:

- a user past ``quota.max_connections`` open connections: the new connection is shut down
  (``shutdown(2)``, not ``close``: libzmq still owns the fd and closes it itself when it reads the end),
  and the socket file is closed to that user alone (a POSIX ACL entry ``user:UID:---``, where the file
  system has ACLs) until one of its connections is gone: its clients' reconnects (libzmq retries every
  100 ms) then fail in ``connect`` with ``EACCES`` and cost the daemon nothing;
- all users together at the listener's cap (``max_connections``, lowered to fit the fd limit, see
  :mod:`autosaved.daemon.fdlimit`): the socket file is closed to new connections (mode 0: ``connect``
  fails with ``EACCES``) until a tenth of them are gone, and what libzmq accepted meanwhile is shut down.

The events are read in a thread of their own, so a busy event loop does not delay a refusal; what libzmq
accepts before the thread catches up is absorbed by the fd headroom the caps leave (half of the fds).
An fd is only shut down after checking it is still a connection of this socket from the same user (the
number may have been reused meanwhile: the worst case is refusing another connection of that same user).

The events are a history, read by a thread that runs behind a flood (hundreds of events), and a new
connection's ``ACCEPTED`` may come before libzmq has read the end of connections whose peers already
closed. So the thread reads every queued event first (a batch) and, before it refuses anything, recounts
from the truth: a counted fd is alive while it still names the same socket and its peer has not hung up
(``fstat`` and ``poll``); the newest connections of the batch are refused only while the live count is
over a cap. A refusal never rests on connections that are gone. (What made root's ``status`` time out
after a flood in issue 19 was not the count: the flood's own connections were still open — libzmq
closes a closed socket's fd later, in its own thread — and a refused connection loses the request
already written into it. The client now tells that at once, see client.base.LinkWatch: the file is closed
to the user before the connection is shut down, so the client finds it so and names the bound.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("autosaved.daemon")

EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED
# How often counted connections are checked against their fds (a lost DISCONNECTED event).
RECONCILE_S = 1.0
# The most queued events handled as one batch (a flood's queue can hold many more).
BATCH = 4096
# A counted connection whose peer is gone: hung up, shut down for writing, or not an open fd any more.
_DEAD = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL
# One warning per user (and for the global cap) per this many seconds: a flood must not flood the log.
WARN_EVERY_S = 10.0
# How long the socket file stays closed to a user one of whose connections was cut for flooding past its
# budget of refusals (rpcserver.RefusalBudget): the rest of that budget's second, give or take a poll.
CUT_DENY_S = 1.0


ACL_XATTR = "system.posix_acl_access"
_UNDEFINED_ID = 0xFFFFFFFF


def acl_denying(mode: int, uids: list[int]) -> bytes:
    """A POSIX access ACL (the kernel's xattr format, version 2) that keeps ``mode``'s owner, group and
    other bits and gives each of ``uids`` no access (pure)."""
    owner, group, other = (mode >> 6) & 7, (mode >> 3) & 7, mode & 7

    def entry(tag: int, perm: int, ident: int = _UNDEFINED_ID) -> bytes:
        return struct.pack("<HHI", tag, perm, ident)

    return (struct.pack("<I", 2) + entry(0x01, owner) + b"".join(entry(0x02, 0, uid) for uid in sorted(uids))
            + entry(0x04, group) + entry(0x10, group) + entry(0x20, other))


def refusal(uid: int | None, user_open: int, total: int, *, per_user: int, total_cap: int) -> str | None:
    """Why a connection just accepted (already counted in ``user_open`` and ``total``) must be refused,
    or ``None`` (pure)."""
    if total > total_cap:
        return f"max_connections: {total - 1} connections are open on the ipc socket (the limit is {total_cap})"
    if uid is not None and user_open > per_user:
        return (f"quota.max_connections: uid {uid} has {user_open - 1} connections open on the ipc socket "
                f"(the limit is {per_user})")
    return None


def peer_uid_of_fd(fd: int, path: str | None) -> int | None:
    """The peer's uid of connection ``fd`` if it is a unix connection of the socket at ``path``; else None."""
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if s.family != socket.AF_UNIX or path is None or s.getsockname() != path:
            return None
        _pid, uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return int(uid)
    except OSError:
        return None
    finally:
        s.detach()


def shut_down(fd: int) -> None:
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
    finally:
        s.detach()


def alive(fds: dict[int, int]) -> set[int]:
    """Which of the connections ``fds`` (fd -> its socket's inode when counted) are still open: the fd names
    the same socket and the peer has not hung up (O(len(fds)) syscalls, no waiting)."""
    same = set()
    for fd, ino in fds.items():
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == ino:
                same.add(fd)
    if not same:
        return same
    poller = select.poll()
    for fd in same:
        poller.register(fd, select.POLLRDHUP)
    return same - {fd for fd, ev in poller.poll(0) if ev & _DEAD}


class ConnGuard:
    """Counts the connections of one listener per user and refuses those over a cap; :meth:`watch` feeds it
    the ROUTER's monitor events in a thread, :meth:`handle` takes one batch of them."""

    def __init__(self, path: str | None, *, total_cap: int, per_user: Callable[[], int]) -> None:
        self.path = path
        self.total_cap = total_cap
        self.per_user = per_user
        self.total = 0
        self.by_uid: dict[int | None, int] = {}
        self.refused = 0
        # The most connections seen open at once (live, after a batch): how far past the cap a burst got
        # before it was refused.
        self.peak = 0
        self.closed = False  # the socket file is closed to new connections (at the global cap)
        self._fds: dict[int, int | None] = {}
        # The socket inode behind each counted fd: a connection whose fd no longer names it is gone, even if
        # its DISCONNECTED event never came or is still queued (see alive()).
        self._inodes: dict[int, int] = {}
        self._reconciled_at = time.monotonic()
        # Counted connections found gone before their DISCONNECTED event was read.
        self.reconciled = 0
        # Users the socket file is closed to (over their cap), and whether the file system takes ACLs.
        self.denied: set[int] = set()
        self._acl_ok = True
        self._warned: dict[int | None, float] = {}
        self._stopping = False
        self._sock: zmq.Socket[Any] | None = None
        self._sock_lock = threading.Lock()
        self._mon: zmq.Socket[Any] | None = None
        self._thread: threading.Thread | None = None
        # Users kept off the socket file until a time, for a flood (cut()), and how many connections were cut.
        self._cut_until: dict[int, float] = {}
        self.cut_count = 0
        # The event thread counts and refuses; the rpc loop cuts (cut()): one at a time.
        self._lock = threading.RLock()

    def watch(self, ctx: zmq.Context[Any], sock: zmq.Socket[Any], lock: threading.Lock | None = None) -> None:
        """Read ``sock``'s connection events in a thread of their own until :meth:`stop`."""
        self._sock = sock
        self._sock_lock = lock or self._sock_lock  # the ROUTER is shared with threads that send on it
        addr = f"inproc://autosaved.monitor.{id(self)}"
        sock.monitor(addr, EVENTS)
        self._mon = ctx.socket(zmq.PAIR)
        # Every event must arrive (a lost DISCONNECTED would count a connection for ever): no high-water mark.
        self._mon.setsockopt(zmq.RCVHWM, 0)
        self._mon.connect(addr)
        self._thread = threading.Thread(target=self._run, name="autosaved-connguard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.join()
        if self._sock is not None:
            with self._sock_lock, contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
        if self._mon is not None:
            self._mon.close(0)
        self._reopen()

    def open_of(self, uid: int) -> int:
        return self.by_uid.get(uid, 0)

    def _run(self) -> None:
        assert self._mon is not None
        while not self._stopping:
            with self._lock:
                if time.monotonic() - self._reconciled_at >= RECONCILE_S:
                    self._recount()
                self.expire_cuts(time.monotonic())
            try:
                if not self._mon.poll(200):
                    continue
                batch: list[tuple[int, int]] = []
                while len(batch) < BATCH:
                    try:
                        event = parse_monitor_message(self._mon.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    batch.append((int(event["event"]), int(event["value"])))
            except zmq.ZMQError:
                return
            try:
                with self._lock:
                    self.handle(batch)
            except Exception:  # a bug here must not end the guard: log it, keep counting
                log.exception("connection guard: a batch of %d events", len(batch))
            if any(kind == zmq.EVENT_MONITOR_STOPPED for kind, _fd in batch):
                return

    def handle(self, events: Sequence[tuple[int, int]]) -> None:
        """Count a batch of monitor events (kind, fd), in order; then refuse the newest connections of the
        batch that are over a cap, by the live count (see the module's docstring)."""
        accepted: list[int] = []
        for kind, fd in events:
            if kind == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
                accepted.append(fd)
            elif kind == zmq.EVENT_DISCONNECTED:
                self._gone(fd)
        if accepted and self._over_a_cap():
            self._recount()
            self.peak = max(self.peak, self.total)
            self._refuse_newest(accepted)
        else:
            self.peak = max(self.peak, self.total)
        if self.total >= self.total_cap and not self.closed and self.path is not None:
            self._close()

    def _over_a_cap(self) -> bool:
        per_user = self.per_user()
        return self.total > self.total_cap or any(
            n > per_user for uid, n in self.by_uid.items() if uid is not None)

    def _refuse_newest(self, accepted: list[int]) -> None:
        # One warning per bound hit, with the count its last refusal left (the cap), not the batch's peak.
        reasons: dict[int | None, str] = {}
        for fd in reversed(accepted):
            if fd not in self._fds:
                continue  # gone already (or refused: a number the batch accepted twice)
            uid = self._fds[fd]
            why = refusal(uid, self.by_uid.get(uid, 0), self.total, per_user=self.per_user(),
                          total_cap=self.total_cap)
            if why is None or peer_uid_of_fd(fd, self.path) != uid:
                continue
            per_user = not why.startswith("max_connections")
            # The file is closed to the user first: a client that sees its connection shut down finds it so,
            # and tells its user it was refused (client.base.closed_early), not that the daemon went away.
            if per_user and uid is not None and uid not in self.denied:
                self.denied.add(uid)
                self._set_acl()
            elif not per_user and not self.closed and self.path is not None:
                self._close()
            shut_down(fd)
            self.refused += 1
            reasons[uid if per_user else None] = why
            # Shut down is gone for the count: its DISCONNECTED, when read, finds nothing to take off.
            self._gone(fd)
        for key, why in reasons.items():
            self._warn(key, f"refused a connection: {why}")

    def cut(self, fd: int, uid: int) -> bool:
        """Shut down connection ``fd`` of ``uid``, which is flooding the daemon with requests past its budget
        of refusals, and close the socket file to ``uid`` for :data:`CUT_DENY_S` (from the rpc loop).

        Why: a muted connection's requests are dropped unanswered, but each one is still received on the
        event loop (a ROUTER cannot stop reading one peer), and a flood of them kept the loop awake and
        every other user's request behind it (issue 19: 10,000 deletes a second took half a core). Cut, the
        flood's next requests wait in the flooder's own process: its reconnects fail in ``connect``
        (``EACCES``) until the file opens again, and cost the daemon nothing. The client sees its requests
        go unanswered and is told the socket file is closed to it (client.base.timed_out). Only a counted
        connection of that user is cut, as for a refusal (the number may have been reused)."""
        # Never wait on the event thread's batch (the event loop calls this): a busy guard skips the cut, and
        # the flood's next second tries again; meanwhile its connection stays muted.
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self.path is None or self._fds.get(fd, -1) != uid or peer_uid_of_fd(fd, self.path) != uid:
                return False
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino != self._inodes.get(fd):
                    return False
            self._cut_until[uid] = time.monotonic() + CUT_DENY_S
            self._set_acl()  # first: the client that sees its connection shut down finds the file closed
            shut_down(fd)
            self.cut_count += 1
            self._gone(fd)
            self._warn(uid, f"cut a connection of uid {uid}: it sent requests past quota.max_requests and "
                            f"past {CUT_DENY_S:g} s of refusals; the socket is closed to the user for "
                            f"{CUT_DENY_S:g} s")
            return True
        finally:
            self._lock.release()

    def expire_cuts(self, now: float) -> None:
        """Open the socket file again to users cut for a flood whose time is up at ``now`` (monotonic)."""
        if not self._cut_until:
            return
        over = [uid for uid, until in self._cut_until.items() if until <= now]
        for uid in over:
            del self._cut_until[uid]
        if over:
            self._set_acl()

    def _accepted(self, fd: int) -> None:
        uid = peer_uid_of_fd(fd, self.path)
        if fd in self._fds:  # an ACCEPTED without its DISCONNECTED: the number was reused; never count twice
            self._gone(fd)
        self._fds[fd] = uid
        try:
            self._inodes[fd] = os.fstat(fd).st_ino
        except OSError:
            self._inodes[fd] = -1  # already closed: the next recount forgets it
        self.total += 1
        self.by_uid[uid] = self.by_uid.get(uid, 0) + 1

    def _gone(self, fd: int) -> None:
        if fd not in self._fds:
            return
        uid = self._fds.pop(fd)
        self._inodes.pop(fd, None)
        self.total -= 1
        left = self.by_uid[uid] - 1
        if left:
            self.by_uid[uid] = left
        else:
            del self.by_uid[uid]
        if uid in self.denied and left < self.per_user():
            self.denied.discard(uid)
            self._set_acl()
        if self.closed and self.total <= self.total_cap - max(1, self.total_cap // 10):
            self._reopen()

    def _recount(self) -> None:
        """Forget counted connections that are gone, whatever events are still queued for them (O(counted):
        at most the cap plus a burst; once a second, and before any refusal)."""
        self._reconciled_at = time.monotonic()
        live = alive(self._inodes)
        for fd in [fd for fd in self._inodes if fd not in live]:
            self.reconciled += 1
            self._gone(fd)

    def _close(self) -> None:
        assert self.path is not None
        try:
            os.chmod(self.path, 0)
        except OSError as exc:
            log.warning("cannot close %s to new connections: %s", self.path, exc)
            return
        self.closed = True
        log.warning("ipc socket: %d connections open, the limit (max_connections); new ones are refused until "
                    "some close", self.total)

    def _reopen(self) -> None:
        if not self.closed or self.path is None:
            return
        try:
            os.chmod(self.path, 0o660)
        except OSError as exc:
            log.warning("cannot reopen %s to new connections: %s", self.path, exc)
            return
        self.closed = False
        log.info("ipc socket: %d connections open; accepting new ones again", self.total)

    def _set_acl(self) -> None:
        """Give the socket file an ACL that denies the users in :attr:`denied` and those cut for a flood (or
        none, when there are none)."""
        if self.path is None or not self._acl_ok:
            return
        denied = self.denied | self._cut_until.keys()
        try:
            if denied:
                os.setxattr(self.path, ACL_XATTR, acl_denying(os.stat(self.path).st_mode, sorted(denied)))
            else:
                with contextlib.suppress(OSError):
                    os.removexattr(self.path, ACL_XATTR)
        except OSError as exc:  # no ACLs here: refusals go on, by shutdown alone
            self._acl_ok = False
            log.warning("cannot set an ACL on %s (%s): users over quota.max_connections are refused connection "
                        "by connection", self.path, exc)

    def _warn(self, key: int | None, message: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning("%s (%d refused so far)", message, self.refused)
