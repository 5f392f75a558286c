"""The daemon's files before it serves: the state dir (checked, locked), the socket's directory and group,
the socket lock, and the stale socket files it unlinks at exit. Pure functions of the config; every
resource registers its undo on the caller's exit stack the moment it is acquired."""

from __future__ import annotations

import contextlib
import grp
import os
import stat
from pathlib import Path

from ..config import Config
from ..errors import AutosavedError
from ..shm import fd_socket_path
from .lock import PidLock


def check_state_dir(path: Path, uid: int) -> None:
    """Refuse a state dir another user owns or others may write into: whoever can write there can plant
    links or forged manifests that the daemon (often root) would then follow or serve."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise AutosavedError(f"state_dir {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise AutosavedError(f"state_dir {path} is not a directory (a symlink is refused too)")
    if st.st_uid != uid:
        raise AutosavedError(f"state_dir {path} is owned by uid {st.st_uid}, not by the daemon's user (uid {uid}); "
                             "give it to the daemon's user (chown) or pick another state_dir")
    if st.st_mode & 0o022:
        raise AutosavedError(f"state_dir {path} is writable by its group or by everyone (mode "
                             f"{stat.S_IMODE(st.st_mode):o}); `chmod go-w {path}` (0700 is the default)")


def socket_gid(config: Config) -> int | None:
    group = config.socket_group
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise AutosavedError(f"socket_group: there is no group named {group!r}") from None


def prepare_paths(config: Config, uid: int, stack: contextlib.AsyncExitStack) -> None:
    # Job state is private to the daemon: clients reach it only through the daemon, which checks who
    # they are. The socket's group is the clients' group, so files must not be group-readable either.
    os.umask(0o077)
    state_dir = config.state_dir
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_state_dir(state_dir, uid)
    lock = PidLock(state_dir / "daemon.lock", f"state dir {state_dir}")
    lock.acquire()
    stack.callback(lock.release)
    sock_path = config.socket_path()
    if sock_path is not None:
        if not sock_path.parent.exists():
            sock_path.parent.mkdir(parents=True, mode=0o700)
        gid = socket_gid(config)
        if gid is not None:
            # Only the daemon's user and this group may enter the socket's directory.
            give_to_group(config, sock_path.parent, gid)
            os.chmod(sock_path.parent, 0o750)
        sock_lock = PidLock(sock_path.with_name(sock_path.name + ".lock"), f"socket {sock_path}")
        sock_lock.acquire()
        stack.callback(sock_lock.release)
        # Unlinked while we still hold the socket lock, so these are ours: a client then fails at once
        # with "no daemon at ..." instead of waiting out its timeout on a dead socket.
        for stale in (str(sock_path), fd_socket_path(config.address)):
            if stale is not None:
                stack.callback(_unlink_quietly, stale)


def give_to_socket_group(config: Config, path: Path) -> None:
    """Give a socket file (or the socket's folder) to the clients' group, if one is configured."""
    gid = socket_gid(config)
    if gid is not None:
        give_to_group(config, path, gid)


def give_to_group(config: Config, path: Path, gid: int) -> None:
    try:
        os.chown(path, -1, gid)
    except OSError as exc:
        raise AutosavedError(
            f"socket_group: cannot give {path} to group {config.socket_group!r}: {exc.strerror}; the "
            "daemon's user must be a member of that group (under systemd, set Group= instead)"
        ) from None


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
