"""The LLM dashboard: tokens generated for clients that left, and what they cost on the GPU."""

from __future__ import annotations

from otel_disconnect.tools.ops.grafana import Dashboard, Panel, Target, Variable

S = 'route=~"$route", model=~"$model"'
TOKENS = "otel_disconnect_llm_tokens_total"
AFTER = "otel_disconnect_llm_tokens_after_disconnect_total"
UNDELIVERED = "otel_disconnect_llm_tokens_undelivered_total"
GENERATION = "otel_disconnect_llm_generation_after_disconnect_seconds"
POWER = "DCGM_FI_DEV_POWER_USAGE"
ABORTED = "otel_disconnect_llm_engine_aborted_requests_total"
ABORTED_TOKENS = "otel_disconnect_llm_engine_aborted_tokens_total"
M = 'model=~"$model"'


def _sum(metric: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{S}}}[$__rate_interval]))"


# The share of output tokens nobody read; clamp_min keeps idle periods at 0 instead of NaN.
WASTE_SHARE = f"{_sum(AFTER)} / clamp_min({_sum(TOKENS)}, 1e-9)"
WASTED_WATTS = f"sum({POWER}) * ({WASTE_SHARE})"
ESTIMATE = (
    "Estimate: GPU power * (tokens generated after disconnect ÷ all tokens generated), i.e. "
    "the power attributed to abandoned generations in proportion to their share of output "
    "tokens. It assumes the GPUs reported by DCGM serve only these models and that every "
    "output token costs the same; prompt processing and idle power are attributed the same way."
)

PANELS = (
    Panel("Output tokens", "Output tokens generated per second.", "short",
          (Target(f"sum(rate({TOKENS}{{{S}}}[$__rate_interval]))", "tokens/s"),),
          "llm", kind="stat", width=6, height=4),
    Panel("Tokens after disconnect", "Output tokens per second generated after the client had "
          "already disconnected.", "short",
          (Target(f"sum(rate({AFTER}{{{S}}}[$__rate_interval]))", "tokens/s"),),
          "llm", kind="stat", width=6, height=4),
    Panel("Waste ratio", "Share of output tokens generated after the client disconnected.",
          "percentunit", (Target(WASTE_SHARE, "waste"),),
          "llm", kind="stat", width=6, height=4, red_above=0.1),
    Panel("Estimated wasted energy", f"Energy spent on abandoned generations over the "
          f"dashboard's time range, in watt-hours. {ESTIMATE}", "watth",
          (Target(f"sum_over_time(({WASTED_WATTS})[$__range:$__interval]) * $__interval_ms "
                  f"/ 3600000", "Wh"),),
          "llm", kind="stat", width=6, height=4),
    Panel("Tokens: total, after disconnect, undelivered", "Output tokens per second by model. "
          "After disconnect: produced after the client left. Undelivered: produced but never "
          "handed to the client.", "short",
          (Target(_sum(TOKENS, "model"), "total {{model}}"),
           Target(_sum(AFTER, "model"), "after disconnect {{model}}"),
           Target(_sum(UNDELIVERED, "model"), "undelivered {{model}}")),
          "llm"),
    Panel("Waste ratio by route and model", "Tokens after disconnect divided by all tokens.",
          "percentunit",
          (Target(f"{_sum(AFTER, 'route, model')} / {_sum(TOKENS, 'route, model')}",
                  "{{route}} {{model}}"),),
          "llm", red_above=0.1),
    Panel("Generation after disconnect", "How long generation went on after the client left "
          "(p50/p99 per model). With cancellation on this should stay below one token's time.",
          "s",
          tuple(Target(f"histogram_quantile({q}, sum by (model, le) "
                       f"(rate({GENERATION}_bucket{{{S}}}[$__rate_interval])))",
                       f"p{round(q * 100)} {{{{model}}}}") for q in (0.5, 0.99)),
          "llm"),
    Panel("Streams generating for nobody", "Seconds of generation after disconnect per second: "
          "the average number of sequences the GPU works on for clients that left.", "short",
          (Target(f"sum by (model) (rate({GENERATION}_sum{{{S}}}[$__rate_interval]))",
                  "{{model}}"),),
          "llm"),
    Panel("Engine: aborted requests by phase", "Requests vLLM's engine aborted, by the phase "
          "their client left in (connected: aborted with the client still there). Counted by "
          "otel-disconnect inside vLLM's API server; vLLM's own abort counter stays at zero.",
          "reqps",
          (Target(f"sum by (model, phase) (rate({ABORTED}{{{M}}}[$__rate_interval]))",
                  "{{model}} {{phase}}"),),
          "llm"),
    Panel("Engine: tokens of aborted requests", "Output tokens per second the engine had "
          "generated for requests it then aborted, by phase: GPU work thrown away.", "short",
          (Target(f"sum by (model, phase) (rate({ABORTED_TOKENS}{{{M}}}[$__rate_interval]))",
                  "{{model}} {{phase}}"),),
          "llm"),
    Panel("vLLM: requests running", "vllm:num_requests_running, sequences in the running batch.",
          "short", (Target("sum by (model_name) (vllm:num_requests_running)", "{{model_name}}"),),
          "llm"),
    Panel("vLLM: generation tokens", "vllm:generation_tokens_total per second, vLLM's own count "
          "of generated tokens, next to otel-disconnect's count.", "short",
          (Target("sum by (model_name) (rate(vllm:generation_tokens_total[$__rate_interval]))",
                  "vLLM {{model_name}}"),
           Target(f"sum by (model) (rate({TOKENS}[$__rate_interval]))",
                  "otel-disconnect {{model}}")),
          "llm"),
    Panel("vLLM: finished requests by reason", "vllm:request_success_total by finished_reason. "
          "abort often stays at zero while clients disconnect: compare with otel-disconnect's "
          "premature disconnects.", "reqps",
          (Target("sum by (finished_reason) "
                  "(rate(vllm:request_success_total[$__rate_interval]))", "{{finished_reason}}"),
           Target("sum(rate(otel_disconnect_client_disconnects_total[$__rate_interval]))",
                  "otel-disconnect: disconnects")),
          "llm"),
    Panel("vLLM: KV cache usage", "vllm:kv_cache_usage_perc, the share of KV cache blocks in "
          "use; abandoned sequences keep theirs until they finish.", "percentunit",
          (Target("avg by (model_name) (vllm:kv_cache_usage_perc)", "{{model_name}}"),),
          "llm", red_above=0.9),
    Panel("GPU power", "DCGM_FI_DEV_POWER_USAGE per GPU (watts), from the NVIDIA DCGM exporter.",
          "watt", (Target(f"sum by (gpu) ({POWER})", "GPU {{gpu}}"),), "llm"),
    Panel("Estimated wasted power", f"Power spent on abandoned generations. {ESTIMATE}", "watt",
          (Target(WASTED_WATTS, "wasted"),), "llm"),
)

DASHBOARD = Dashboard(
    uid="otel-disconnect-llm",
    title="otel-disconnect / LLM tokens",
    description="Tokens generated for clients that disconnected, vLLM's view, and GPU power.",
    panels=PANELS,
    variables=(Variable("route", "Route", TOKENS), Variable("model", "Model", TOKENS)),
)
