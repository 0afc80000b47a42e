"""The overview dashboard: who hangs up, when, and what the server keeps doing for nobody."""

from __future__ import annotations

from otel_disconnect.tools.ops.grafana import Dashboard, Panel, Target, Variable

R = 'route=~"$route"'
DISCONNECTS = "otel_disconnect_client_disconnects_total"
REQUESTS = "otel_disconnect_requests_total"
WAIT = "otel_disconnect_client_wait_seconds"
WORK = "otel_disconnect_work_after_disconnect_seconds"
FLEET = "otel_disconnect_fleet_"
FLEET_ROW = "Fleet channel (Redis)"
UP_DOWN = ({"type": "value", "options": {
    "0": {"text": "down", "color": "red", "index": 0},
    "1": {"text": "up", "color": "green", "index": 1},
}},)


def _rate(metric: str, by: str, selector: str = R) -> str:
    matchers = f"{{{selector}}}" if selector else ""
    return f"sum by ({by}) (rate({metric}{matchers}[$__rate_interval]))"


def _quantiles(metric: str, by: str) -> tuple[Target, ...]:
    return tuple(
        Target(
            f"histogram_quantile({q}, sum by ({by}, le) "
            f"(rate({metric}_bucket{{{R}}}[$__rate_interval])))",
            f"p{round(q * 100)} {{{{{by.split(',', maxsplit=1)[0]}}}}}",
        )
        for q in (0.5, 0.9, 0.99)
    )


PANELS = (
    Panel(
        "Premature disconnects", "Clients that hung up before the final response body, per "
        "second, all selected routes.", "reqps",
        (Target(f"sum(rate({DISCONNECTS}{{{R}}}[$__rate_interval]))", "disconnects"),),
        "app", kind="stat", width=6, height=4,
    ),
    Panel(
        "Disconnect ratio", "Share of requests whose client hung up before the final response "
        "body.", "percentunit",
        (Target(f"sum(rate({DISCONNECTS}{{{R}}}[$__rate_interval])) / "
                f"sum(rate({REQUESTS}{{{R}}}[$__rate_interval]))", "ratio"),),
        "app", kind="stat", width=6, height=4, red_above=0.05,
    ),
    Panel(
        "Zombie requests now", "Requests still running whose client already left "
        "(client=\"disconnected\"). They hold a concurrency slot, a GPU stream or a pooled DB "
        "connection for nobody.", "short",
        (Target('sum(otel_disconnect_inflight_requests{client="disconnected"})', "zombies"),),
        "app", kind="stat", width=6, height=4, red_above=1,
    ),
    Panel(
        "Retries after disconnect", "Requests per second that repeat a request whose client "
        "disconnected within the retry window: each one adds work while the abandoned one may "
        "still run.", "reqps",
        (Target(f"sum(rate(otel_disconnect_retries_after_disconnect_total{{{R}}}"
                f"[$__rate_interval]))", "retries"),),
        "retry", kind="stat", width=6, height=4,
    ),
    Panel(
        "Disconnects by route and phase", "Premature disconnects per second. phase: "
        "request_body (upload not finished), before_response (handler running, nothing sent, "
        "includes waiting for the first LLM token), streaming (response started).", "reqps",
        (Target(_rate(DISCONNECTS, "route, phase"), "{{route}} {{phase}}"),),
        "app",
    ),
    Panel(
        "Disconnect ratio by route", "Premature disconnects divided by requests, per route.",
        "percentunit",
        (Target(f"{_rate(DISCONNECTS, 'route')} / {_rate(REQUESTS, 'route')}", "{{route}}"),),
        "app", red_above=0.05,
    ),
    Panel(
        "Client wait before disconnect", "How long clients that left waited, as a heatmap of the "
        "histogram buckets (5, 10, 15, 30, 60 s are bucket bounds). A client timeout shorter "
        "than the server's shows as a bright band at one bucket: a 10 s client timeout against "
        "a 30 s server timeout lights up the 10 s row while the server keeps working.", "s",
        (Target(f"sum by (le) (increase({WAIT}_bucket{{{R}}}[$__rate_interval]))", "{{le}}",
                heatmap=True),),
        "app", kind="heatmap",
    ),
    Panel(
        "Client wait quantiles", "p50/p90/p99 of how long disconnecting clients waited, per "
        "route. Quantiles that collapse onto one value (p50 = p99 = 10 s) mean clients hang up "
        "at a fixed timeout, not out of impatience.", "s",
        _quantiles(WAIT, "route"),
        "app",
    ),
    Panel(
        "Disconnects in the 5-10 s band", "Share of disconnects whose client waited more than "
        "5 s and at most 10 s: close to 100 % when clients use a 10 s timeout. Compare with the "
        "server timeout (often 30 s): the gap is work done for nobody.", "percentunit",
        # le="10.0" from prometheus-client and opentelemetry-exporter-prometheus, le="10" from
        # the collector's exporters and Prometheus' OTLP receiver: one query for both.
        (Target(
            f"(sum by (route) (rate({WAIT}_bucket{{{R}, le=~\"10(\\\\.0)?\"}}[$__rate_interval]))"
            f" - sum by (route) (rate({WAIT}_bucket{{{R}, le=~\"5(\\\\.0)?\"}}"
            "[$__rate_interval]))) / "
            f"sum by (route) (rate({WAIT}_count{{{R}}}[$__rate_interval]))", "{{route}}"),),
        "app",
    ),
    Panel(
        "Outcome after disconnect", "What the app did after its client left: completed (ran to "
        "the end, response dropped), cancelled, error.", "reqps",
        (Target(_rate(DISCONNECTS, "route, outcome"), "{{route}} {{outcome}}"),),
        "app",
    ),
    Panel(
        "Work after disconnect", "Time from detecting the disconnect to the end of the app "
        "task (p50/p90/p99 per route). With cancellation on it should be near zero.", "s",
        _quantiles(WORK, "route"),
        "app",
    ),
    Panel(
        "Handler time spent for nobody", "Seconds of handler time after disconnect, per second "
        "of wall time: roughly how many request slots are busy with abandoned work.", "s",
        (Target(f"sum by (route, outcome) (rate({WORK}_sum{{{R}}}[$__rate_interval]))",
                "{{route}} {{outcome}}"),),
        "app",
    ),
    Panel(
        "In-flight requests: connected vs zombie", "Requests in flight by whether their client "
        "is still there. Zombies count against the agreed concurrency (for example 32) although "
        "nobody reads their result. No route label: it is unknown when a request starts.",
        "short",
        (Target("sum by (client) (otel_disconnect_inflight_requests)", "{{client}}"),),
        "app",
    ),
    Panel(
        "Response bytes dropped", "Response body bytes the app sent after its client left, per "
        "second.", "Bps",
        (Target(_rate("otel_disconnect_bytes_after_disconnect_total", "route"), "{{route}}"),),
        "app",
    ),
    Panel(
        "Retries after disconnect by route", "Requests per second repeating a request that "
        "disconnected within the retry window. Retries while the abandoned request still runs "
        "multiply the load: a retry storm.", "reqps",
        (Target(_rate("otel_disconnect_retries_after_disconnect_total", "route"), "{{route}}"),),
        "retry",
    ),
    # The Redis fleet channel (README, "Many workers and pods"): no series without redis_url.
    Panel(
        "Fleet channel up by instance", "1 while every worker of the instance reads and writes "
        "the fleet's Redis stream, 0 while one cannot (min over its live workers): retry "
        "detection then falls back to the process, and its events wait in its queue. Alert: "
        "FleetChannelDown.", "short",
        (Target(f"min by (job, instance) ({FLEET}channel_up)", "{{job}} {{instance}}"),),
        "fleet", mappings=UP_DOWN, row=FLEET_ROW,
    ),
    Panel(
        "Fleet events queued", "Events waiting in a process for Redis (the fullest worker of "
        "each instance). Grows while Redis is down or slow; at 10,000 further events are "
        "dropped.", "short",
        (Target(f"max by (job, instance) ({FLEET}events_queued)", "{{job}} {{instance}}"),),
        "fleet", red_above=10_000, row=FLEET_ROW,
    ),
    Panel(
        "Fleet events published and received by kind", "Events per second written to the "
        "fleet's stream (one per disconnect and per transaction claim, none per request whose "
        "client stayed) and read from the other processes of the fleet.", "ops",
        (Target(_rate(f"{FLEET}events_published_total", "kind", ""), "published {{kind}}"),
         Target(_rate(f"{FLEET}events_received_total", "kind", ""), "received {{kind}}")),
        "fleet", row=FLEET_ROW,
    ),
    Panel(
        "Fleet events dropped by reason", "Events dropped per second: queue_full (Redis down or "
        "too slow: lost for good; alert FleetEventsDropped), foreign (another fleet's) and "
        "malformed (not this version's format), written into the stream by something else "
        "(alert FleetEventsRejected).", "ops",
        (Target(_rate(f"{FLEET}events_dropped_total", "reason", ""), "{{reason}}"),),
        "fleet", row=FLEET_ROW,
    ),
)

DASHBOARD = Dashboard(
    uid="otel-disconnect-overview",
    title="otel-disconnect / Overview",
    description="Client disconnects in ASGI services and the work they leave behind.",
    panels=PANELS,
    variables=(Variable("route", "Route", REQUESTS),),
)
