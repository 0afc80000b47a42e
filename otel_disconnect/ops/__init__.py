"""What operators import: Grafana dashboards, Prometheus alert rules, Grafana provisioning.

Generated from code (``python -m otel_disconnect.ops``); ``otel-disconnect export DIR`` writes
the copies shipped in the package.
"""
