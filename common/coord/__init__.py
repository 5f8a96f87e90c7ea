"""Coordination through Redis: worker registry, router-side watcher, prefix index, a local redis-server."""

from common.coord.prefix_index import PrefixLookup, PrefixPublisher
from common.coord.redis_client import connect
from common.coord.redis_server import RedisServer
from common.coord.registry import WorkerRegistration
from common.coord.watcher import RegistryWatcher
from common.coord.worker_info import WorkerInfo

__all__ = [
    "PrefixLookup",
    "PrefixPublisher",
    "RedisServer",
    "RegistryWatcher",
    "WorkerInfo",
    "WorkerRegistration",
    "connect",
]
