"""One module per group of routes; api/app.py includes their routers."""

from defiwatch.api.routes import events, health, ingest, latest

__all__ = ["events", "health", "ingest", "latest"]
