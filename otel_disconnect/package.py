"""What `opentelemetry-instrument` checks before it loads the instrumentor."""

_instruments = ("starlette >= 0.40",)
