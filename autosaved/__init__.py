"""autosaved: a host daemon that checkpoints training jobs, and the SDK trainers use to talk to it.

    import autosaved
    with autosaved.Client("my-job") as ckpt:
        state = ckpt.restore() or {"step": 0}
        ckpt.update({"model": model.state_dict(), "step": n}, step=n)
"""

__version__ = "0.1.0"

from .client import Ack, Admin, AsyncAdmin, AsyncClient, Client, Exported, Replaced
from .client.lazy import LazyClient, PendingUpdate
from .errors import (
    AlreadyRunning,
    AutosavedError,
    ConfigError,
    CorruptVersion,
    DaemonUnavailable,
    Forbidden,
    InvalidJobName,
    InvalidValue,
    MessageTooLarge,
    NotFound,
    ProtocolError,
    ShuttingDown,
    StateLost,
    StorageError,
)
from .offline import CorruptVersionWarning, restore
from .tree import DELETE

__all__ = [
    "DELETE",
    "Ack",
    "Admin",
    "AlreadyRunning",
    "AsyncAdmin",
    "AsyncClient",
    "AutosavedError",
    "Client",
    "ConfigError",
    "CorruptVersion",
    "CorruptVersionWarning",
    "DaemonUnavailable",
    "Exported",
    "Forbidden",
    "InvalidJobName",
    "InvalidValue",
    "LazyClient",
    "MessageTooLarge",
    "NotFound",
    "PendingUpdate",
    "ProtocolError",
    "Replaced",
    "ShuttingDown",
    "StateLost",
    "StorageError",
    "__version__",
    "restore",
]
