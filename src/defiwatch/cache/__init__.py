"""The hot cache: the newest value and windowed changes of every series. Memory or Redis."""

from defiwatch.cache.base import HotCache
from defiwatch.cache.memory import MemoryHotCache
from defiwatch.cache.redis import RedisHotCache

__all__ = ["HotCache", "MemoryHotCache", "RedisHotCache"]
