"""vLLM-named Prometheus metrics of the simulator, on its own registry.

Names and labels follow vLLM's V1 engine (``model_name``, ``engine``) so dashboards and alert
rules written for vLLM work unchanged. ``DCGM_FI_DEV_POWER_USAGE`` is SIMULATED: idle watts plus
a fixed draw per running request, capped, standing in for the DCGM exporter of a real GPU.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# vLLM's own request latency buckets.
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
FINISHED_REASONS = ("stop", "length", "abort")


class SimMetrics:
    def __init__(self, registry: CollectorRegistry, model: str, *, idle_watts: float,
                 watts_per_request: float, max_watts: float) -> None:
        labels = ["model_name", "engine"]
        values = (model, "0")
        self.registry = registry
        self.running = Gauge("vllm:num_requests_running", "Requests in the model execution batch.",
                             labels, registry=registry).labels(*values)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed.",
                             labels, registry=registry).labels(*values)
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc",
                                    "KV-cache usage. 1 means 100 percent usage.",
                                    labels, registry=registry).labels(*values)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.",
                                         labels, registry=registry).labels(*values)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.",
                                     labels, registry=registry).labels(*values)
        success = Counter("vllm:request_success", "Finished requests by finish reason.",
                          [*labels, "finished_reason"], registry=registry)
        self.success = {reason: success.labels(*values, reason) for reason in FINISHED_REASONS}
        self.e2e_latency = Histogram("vllm:e2e_request_latency_seconds",
                                     "End to end request latency in seconds.", labels,
                                     buckets=E2E_BUCKETS, registry=registry).labels(*values)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Time to first token in seconds.", labels,
                              buckets=TTFT_BUCKETS, registry=registry).labels(*values)
        self.power = Gauge("DCGM_FI_DEV_POWER_USAGE",
                           "SIMULATED GPU power draw in watts (idle + per running request).",
                           ["gpu", "modelName"], registry=registry).labels("0", "simulated")
        self._idle_watts = idle_watts
        self._watts_per_request = watts_per_request
        self._max_watts = max_watts
        self.power.set(idle_watts)

    def load(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_cache_usage.set(min(1.0, kv_usage))
        self.power.set(min(self._max_watts, self._idle_watts + self._watts_per_request * running))
