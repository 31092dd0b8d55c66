"""The event stream: offsets, bounded retention, replay. Memory (embedded) or Redis Streams."""

from defiwatch.stream.base import EventStream, StreamSlice
from defiwatch.stream.memory import MemoryEventStream
from defiwatch.stream.redis import RedisEventStream

__all__ = ["EventStream", "MemoryEventStream", "RedisEventStream", "StreamSlice"]
