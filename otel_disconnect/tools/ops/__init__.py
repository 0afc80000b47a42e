"""What operators import: Grafana dashboards, Prometheus alert rules, Grafana provisioning.

Generated from code (``otel-disconnect generate``); ``otel-disconnect export DIR`` writes
the copies shipped in the package.
"""
