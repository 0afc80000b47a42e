"""The embedded PostgreSQL lives in the package (the demo uses it too)."""

from otel_disconnect.tools.demo.postgres import EmbeddedPostgres, PostgresUnavailable

__all__ = ["EmbeddedPostgres", "PostgresUnavailable"]
