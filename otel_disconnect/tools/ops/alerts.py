"""The Prometheus alert rules (docs/runbooks.md), defined once.

Thresholds are for production traffic; docs/runbooks.md explains each one. ``rules_document``
can shorten every ``for:`` (the end-to-end test does, to finish in seconds) without touching the
shipped file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RUNBOOK_BASE = "https://github.com/otel-disconnect/otel-disconnect/blob/main/docs/runbooks.md"
RULES_FILENAME = "otel-disconnect.rules.yml"
SEVERITIES = ("critical", "warning", "info")


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    source: str  # which telemetry source feeds it, as for dashboard panels

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"{self.name}: severity {self.severity!r}")
        if not self.summary.endswith(".") or "{{" in self.summary:
            raise ValueError(f"{self.name}: the summary is static and ends with a period")

    @property
    def anchor(self) -> str:
        return self.name.lower()

    @property
    def runbook_url(self) -> str:
        return f"{RUNBOOK_BASE}#{self.anchor}"

    def rule(self, for_override: str | None = None) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": for_override or self.for_,
            "labels": {"severity": self.severity},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": self.runbook_url,
            },
        }


ALERTS = (
    Alert(
        "IdleInTransactionTooLong",
        "max by (datname, application_name) "
        "(otel_disconnect_pg_idle_in_transaction_max_seconds) > 300",
        "2m", "warning",
        "A PostgreSQL backend has been idle in transaction for more than 5 minutes.",
        "A backend of {{ $labels.application_name }} on database {{ $labels.datname }} has been "
        "idle in transaction for {{ $value | humanizeDuration }}; it holds its locks and blocks "
        "vacuum until it ends.",
        "pg",
    ),
    Alert(
        "OrphanedTransactionAfterDisconnect",
        "sum by (datname, application_name, owner) "
        "(otel_disconnect_pg_orphaned_transactions) > 0",
        "1m", "critical",
        "A transaction is held open for a request whose client disconnected.",
        "{{ $value }} transaction(s) of {{ $labels.application_name }} on {{ $labels.datname }} "
        "are idle in transaction for requests whose client is gone "
        "(owner={{ $labels.owner }}; \"ended\" means the request ended and the connection leaked).",
        "pg",
    ),
    Alert(
        "DBConnectionsLeftOpenAfterCancel",
        "sum by (route, state) "
        "(increase(otel_disconnect_db_connections_left_open_total[10m])) > 0",
        "5m", "warning",
        "Disconnected requests ended with database connections still checked out.",
        "{{ $value | humanize }} connection(s) in state {{ $labels.state }} were still checked out "
        "or in a transaction when disconnected requests on {{ $labels.route }} ended (last 10 "
        "minutes).",
        "pg",
    ),
    Alert(
        "DBPoolConnectionsTerminated",
        "sum by (job, outcome) "
        "(rate(otel_disconnect_db_checkins_total{outcome=~\"terminated|invalidated\"}[10m]))\n"
        "  / ignoring (outcome) group_left\n"
        "sum by (job) (rate(otel_disconnect_db_checkins_total[10m])) > 0.05",
        "10m", "warning",
        "More than 5% of pool check-ins throw the connection away.",
        "{{ $value | humanizePercentage }} of connection check-ins in {{ $labels.job }} ended "
        "{{ $labels.outcome }}: connections came back to the pool in a state it could not reset.",
        "pg",
    ),
    Alert(
        "LLMTokensWastedAfterDisconnect",
        "(\n"
        "  sum by (route, model) (rate(otel_disconnect_llm_tokens_after_disconnect_total[10m]))\n"
        "    /\n"
        "  sum by (route, model) (rate(otel_disconnect_llm_tokens_total[10m]))\n"
        ") > 0.1\n"
        "and\n"
        "sum by (route, model) (rate(otel_disconnect_llm_tokens_total[10m])) > 1",
        "15m", "warning",
        "More than 10% of output tokens are generated after the client disconnected.",
        "{{ $value | humanizePercentage }} of the output tokens of model {{ $labels.model }} on "
        "{{ $labels.route }} were generated after the client had disconnected.",
        "llm",
    ),
    Alert(
        "LLMEngineTokensAborted",
        "(\n"
        "  sum by (model) (rate(otel_disconnect_llm_engine_aborted_tokens_total[10m]))\n"
        "    /\n"
        "  sum by (model) (rate(otel_disconnect_llm_tokens_total[10m]))\n"
        ") > 0.1\n"
        "and\n"
        "sum by (model) (rate(otel_disconnect_llm_tokens_total[10m])) > 1",
        "15m", "warning",
        "More than 10% of the tokens the engine generates belong to requests it then aborts.",
        "{{ $value | humanizePercentage }} of the output tokens of model {{ $labels.model }} "
        "went to requests the engine aborted (their clients left): GPU time spent for nobody.",
        "llm",
    ),
    Alert(
        "GPUGeneratingForDisconnectedClients",
        "sum by (model) "
        "(rate(otel_disconnect_llm_generation_after_disconnect_seconds_sum[10m])) > 0.5",
        "10m", "warning",
        "The GPU keeps generating for clients that already disconnected.",
        "Model {{ $labels.model }} spends {{ $value | humanize }} generation-seconds per second on "
        "sequences whose client disconnected.",
        "llm",
    ),
    Alert(
        "ZombieRequests",
        "sum by (job, instance) "
        "(otel_disconnect_inflight_requests{client=\"disconnected\"}) > 3",
        "5m", "warning",
        "Requests keep running after their clients disconnected.",
        "{{ $value }} requests on {{ $labels.instance }} ({{ $labels.job }}) are still running "
        "for clients that disconnected; they hold concurrency slots and connections for nobody.",
        "app",
    ),
    Alert(
        "ClientsAbandonBeforeResponse",
        "(\n"
        "  sum by (route) "
        "(rate(otel_disconnect_client_disconnects_total{phase=\"before_response\"}[5m]))\n"
        "    /\n"
        "  sum by (route) (rate(otel_disconnect_requests_total[5m]))\n"
        ") > 0.05\n"
        "and\n"
        "sum by (route) (rate(otel_disconnect_requests_total[5m])) > 0.05",
        "10m", "warning",
        "More than 5% of clients hang up before getting a response.",
        "{{ $value | humanizePercentage }} of the requests to {{ $labels.route }} were abandoned "
        "by their client before the response started: check client timeouts against server "
        "latency.",
        "app",
    ),
    Alert(
        "RetryStormAfterDisconnect",
        "(\n"
        "  sum by (route) (rate(otel_disconnect_retries_after_disconnect_total[5m]))\n"
        "    /\n"
        "  sum by (route) (rate(otel_disconnect_requests_total[5m]))\n"
        ") > 0.2",
        "5m", "critical",
        "Clients retry requests they abandoned while the abandoned work still runs.",
        "{{ $value | humanizePercentage }} of the requests to {{ $labels.route }} repeat a request "
        "whose client disconnected; each retry adds load on top of the abandoned work.",
        "retry",
    ),
    Alert(
        "IdleInTransactionTimeoutDisabled",
        "otel_disconnect_pg_idle_in_transaction_session_timeout_seconds == 0",
        "30m", "info",
        "PostgreSQL idle_in_transaction_session_timeout is disabled.",
        "idle_in_transaction_session_timeout is 0 on {{ $labels.instance }}: a transaction "
        "abandoned by a disconnected request stays open until someone terminates it.",
        "pg",
    ),
    Alert(
        "PgActivityCollectorDown",
        "otel_disconnect_pg_up == 0",
        "5m", "warning",
        "The pg_stat_activity collector cannot read PostgreSQL.",
        "otel_disconnect_pg_up is 0 on {{ $labels.instance }} ({{ $labels.job }}): idle-in-"
        "transaction and orphan alerts are blind.",
        "pg",
    ),
    Alert(
        # livemin: one worker of a pod cut off from Redis makes its pod's series 0. Per pod: a
        # pod whose network or URL is wrong is named, and a Redis outage names every pod.
        "FleetChannelDown",
        "min by (job, instance, pod) (otel_disconnect_fleet_channel_up) == 0",
        "5m", "warning",
        "A process cannot reach the fleet's Redis stream: retry detection is per process.",
        "At least one process on {{ $labels.instance }} ({{ $labels.job }}) cannot read or "
        "write the fleet's Redis stream: it detects retries only among its own requests, and "
        "its events (disconnects, orphaned transactions) wait in its queue meanwhile.",
        "fleet",
    ),
    Alert(
        "FleetEventsDropped",
        "sum by (job, instance, pod) "
        "(increase(otel_disconnect_fleet_events_dropped_total{reason=\"queue_full\"}[10m])) > 0",
        "1m", "warning",
        "Fleet events are dropped because Redis does not take them fast enough.",
        "{{ $value | humanize }} fleet event(s) of {{ $labels.instance }} ({{ $labels.job }}) "
        "were dropped in the last 10 minutes: its queue for Redis was full. Those disconnects "
        "and orphaned transactions are lost to the other processes and the pg-exporter.",
        "fleet",
    ),
    Alert(
        # Every process reads every event of its stream: per job, not per pod (N copies).
        "FleetEventsRejected",
        "sum by (job, reason) "
        "(rate(otel_disconnect_fleet_events_dropped_total{reason=~\"foreign|malformed\"}[5m]))"
        " > 0",
        "15m", "info",
        "Something other than this fleet writes into the fleet's Redis stream.",
        "{{ $labels.job }} keeps rejecting {{ $labels.reason }} events from its fleet's Redis "
        "stream: another version of otel-disconnect or another writer uses the same stream, and "
        "its events are ignored.",
        "fleet",
    ),
    Alert(
        "OtelDisconnectInternalErrors",
        "sum by (job, where) (increase(otel_disconnect_internal_errors_total[15m])) > 0",
        "1m", "info",
        "otel-disconnect caught errors inside its instrumentation.",
        "{{ $value | humanize }} internal error(s) in {{ $labels.where }} ({{ $labels.job }}) in "
        "the last 15 minutes. The app was not affected, but some telemetry is missing.",
        "app",
    ),
)


def rules_document(for_override: str | None = None) -> dict[str, Any]:
    """The rule file as a dict; ``for_override`` replaces every ``for:`` (tests only)."""
    return {"groups": [{
        "name": "otel-disconnect",
        "rules": [alert.rule(for_override) for alert in ALERTS],
    }]}
