"""Sinks: Prometheus metrics and OpenTelemetry span attributes, fed by the recorder."""
