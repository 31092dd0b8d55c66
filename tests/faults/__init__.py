"""Multi-process fault suite: every role in its own process on a PostgreSQL and Redis of its own."""
