from .admin import Admin, AsyncAdmin
from .aio import AsyncClient
from .base import Ack
from .core import Exported, Replaced
from .sync import Client

__all__ = ["Ack", "Admin", "AsyncAdmin", "AsyncClient", "Client", "Exported", "Replaced"]
