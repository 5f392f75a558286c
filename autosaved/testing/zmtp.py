"""A raw ZMTP 3.0 peer on a unix socket: what a hostile client can send that libzmq's own sockets never
do (a frame announced and never finished, a multipart message whose last frame never comes)."""

from __future__ import annotations

import socket
import struct

GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def dealer(path: str) -> socket.socket:
    """A connected DEALER past the handshake (the daemon's greeting read; its READY is left unread)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(GREETING)
    got = b""
    while len(got) < len(GREETING):
        chunk = s.recv(len(GREETING) - len(got))
        if not chunk:
            raise ConnectionResetError(f"{path} closed the connection in the handshake")
        got += chunk
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(b"\x04" + bytes([len(body)]) + body)
    return s


def frame_header(size: int, *, more: bool = False) -> bytes:
    """A long frame's header announcing ``size`` bytes (the more-flag: more frames of its message follow)."""
    return bytes([0x02 | (0x01 if more else 0x00)]) + struct.pack(">Q", size)


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """Whether the peer ends the connection within ``timeout`` s (its unread READY and replies skipped)."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
