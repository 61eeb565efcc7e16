"""Durable state behind the pool: the store contract and its implementations."""

from authpool_server.store.base import Snapshot, Store, WriteBatch

__all__ = ["Snapshot", "Store", "WriteBatch"]
