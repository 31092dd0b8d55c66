"""The HTTP API (FastAPI): health, events, latest values, ingest; keys and scopes."""

from defiwatch.api.app import ApiContext, create_app

__all__ = ["ApiContext", "create_app"]
