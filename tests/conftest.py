from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_binary(name: str) -> str:
    """The path of an external binary; skip without it, except in CI where it must be there."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} not installed")
    return path


@dataclass
class Telemetry:
    registry: CollectorRegistry
    tracer_provider: TracerProvider
    exporter: InMemorySpanExporter

    def options(self) -> dict[str, Any]:
        return {"registry": self.registry, "tracer_provider": self.tracer_provider}

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def server_spans(self) -> list[ReadableSpan]:
        from opentelemetry.trace import SpanKind

        return [s for s in self.exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Telemetry(CollectorRegistry(), provider, exporter)
    provider.shutdown()
