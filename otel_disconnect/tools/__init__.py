"""The tools around the library: the ``otel-disconnect`` command, the demo, the LLM simulator,
the probe, and the dashboard and alert generators.

The library never imports this package (tests/test_layout.py checks it): an app that adds the
middleware loads none of this code. It ships in the same distribution so that the metric names
the tools read and the dashboards query are always those of the installed library.
"""
