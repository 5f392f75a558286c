"""One exception tree for the client SDK and the daemon.

Every error that crosses the wire carries a stable ``code`` (a short string that scripts may match on)
and a human message. :func:`error_for_code` turns a wire error back into the matching exception class.
"""

from __future__ import annotations

from typing import Any


class AutosavedError(Exception):
    """Base of every error autosaved raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}


class DaemonUnavailable(AutosavedError):
    """The daemon did not answer at the address tried (not running, hung, or the socket is missing)."""

    code = "unavailable"


class ProtocolError(AutosavedError):
    """A message could not be understood (garbage, wrong version, unknown op, missing fields)."""

    code = "bad_request"


class InvalidJobName(AutosavedError, ValueError):
    """A job name that could escape its folder or is otherwise unusable."""

    code = "bad_job"


class InvalidValue(AutosavedError, TypeError):
    """A state value autosaved cannot store; the message names the path inside the state."""

    code = "bad_value"


class MessageTooLarge(AutosavedError):
    code = "too_large"


class NotFound(AutosavedError, LookupError):
    """A job or a version that does not exist."""

    code = "not_found"


class StateLost(AutosavedError):
    """The daemon restarted and lost deltas it had acknowledged only as ``accepted``.

    ``details`` holds ``acked_seq`` (the last update the daemon acknowledged to this client) and
    ``durable_seq`` (the last one that survived). The trainer should send its full state again.
    """

    code = "state_lost"


class ShuttingDown(AutosavedError):
    """The daemon is flushing for shutdown and no longer accepts updates."""

    code = "shutting_down"


class StorageError(AutosavedError, OSError):
    """Reading or writing the state dir failed (disk full, I/O error, permissions)."""

    code = "io_error"


class CorruptVersion(StorageError):
    """A stored version failed verification (hash mismatch, missing chunk, unreadable manifest)."""

    code = "corrupt"


class Forbidden(AutosavedError, PermissionError):
    """The caller may not act on that job (another user's, and the caller is not root)."""

    code = "forbidden"


class QuotaExceeded(AutosavedError):
    """A per-user limit (``quota.max_jobs``, ``quota.max_bytes``) would be exceeded; nothing was applied."""

    code = "quota"


class Expired(AutosavedError):
    """The request waited in the daemon past the deadline its client sent (``expires``): the client has
    given up on it, so it was not applied."""

    code = "expired"


class ConfigError(AutosavedError, ValueError):
    """An invalid configuration value; the message names the key."""

    code = "bad_config"


class AlreadyRunning(AutosavedError):
    """Another daemon holds the state dir or the socket."""

    code = "already_running"


class InternalError(AutosavedError):
    code = "internal"


_BY_CODE: dict[str, type[AutosavedError]] = {
    cls.code: cls
    for cls in (
        AutosavedError,
        DaemonUnavailable,
        ProtocolError,
        InvalidJobName,
        InvalidValue,
        MessageTooLarge,
        NotFound,
        StateLost,
        ShuttingDown,
        StorageError,
        CorruptVersion,
        Forbidden,
        QuotaExceeded,
        Expired,
        ConfigError,
        AlreadyRunning,
        InternalError,
    )
}
# Codes the daemon sends that share a class with another code.
_BY_CODE.update({"bad_version": ProtocolError, "unknown_op": ProtocolError})


def error_for_code(code: str, message: str, details: dict[str, Any] | None = None) -> AutosavedError:
    cls = _BY_CODE.get(code, AutosavedError)
    err = cls(message, details=details)
    if cls is AutosavedError or code != cls.code:
        err.code = code
    return err
