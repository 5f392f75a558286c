from .aio import AsyncClient
from .base import Ack
from .sync import Client

__all__ = ["Ack", "AsyncClient", "Client"]
