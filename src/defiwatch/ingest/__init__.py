"""Ingestion: every source (poller, replay, HTTP, direct SQL) ends in the ingest service."""

from defiwatch.ingest.base import IngestResult, PointSink

__all__ = ["IngestResult", "PointSink"]
