"""The database dashboard: transactions interrupted by disconnects and the ones left open."""

from __future__ import annotations

from otel_disconnect.tools.ops.grafana import Dashboard, Panel, Target, Variable

R = 'route=~"$route"'
D = 'datname=~"$datname"'
IDLE_IN_TX = 'state=~"idle in transaction.*"'  # includes "idle in transaction (aborted)"

PANELS = (
    Panel("idle_in_transaction_session_timeout", "PostgreSQL's "
          "idle_in_transaction_session_timeout as the collector's session sees it. 0 means "
          "disabled: a transaction abandoned by a disconnected request stays open forever.", "s",
          (Target("min(otel_disconnect_pg_idle_in_transaction_session_timeout_seconds)",
                  "timeout"),),
          "pg", kind="stat", width=6, height=4,
          mappings=({"type": "value", "options": {"0": {"text": "disabled", "color": "red"}}},)),
    Panel("Collector up", "1 when the last pg_stat_activity read succeeded.", "bool_yes_no",
          (Target("min(otel_disconnect_pg_up)", "up"),), "pg", kind="stat", width=6, height=4),
    Panel("Orphaned transactions", "Backends idle in transaction held for requests whose "
          "client is gone.", "short",
          (Target(f"sum(otel_disconnect_pg_orphaned_transactions{{{D}}})", "orphans"),),
          "pg", kind="stat", width=6, height=4, red_above=1),
    Panel("Longest idle in transaction", "now - state_change of the longest idle-in-transaction "
          "backend.", "s",
          (Target(f"max(otel_disconnect_pg_idle_in_transaction_max_seconds{{{D}}})", "max"),),
          "pg", kind="stat", width=6, height=4, red_above=300),
    Panel("Transactions interrupted by disconnect", "Database transactions open when the "
          "client of their request disconnected, per second, by the state they were in.", "ops",
          (Target(f"sum by (route, state) (rate("
                  f"otel_disconnect_db_transactions_interrupted_total{{{R}}}[$__rate_interval]))",
                  "{{route}} {{state}}"),),
          "pg"),
    Panel("Connections left open", "Connections still checked out or in a transaction when a "
          "disconnected request ended, per second. Anything above zero is a leak.", "ops",
          (Target(f"sum by (route, state) (rate("
                  f"otel_disconnect_db_connections_left_open_total{{{R}}}[$__rate_interval]))",
                  "{{route}} {{state}}"),),
          "pg"),
    Panel("Pool check-ins by outcome", "Connections returned to the pool per second: clean, "
          "rolled_back (the pool reset a transaction), terminated, invalidated.", "ops",
          (Target("sum by (outcome) "
                  "(rate(otel_disconnect_db_checkins_total[$__rate_interval]))", "{{outcome}}"),),
          "pg"),
    Panel("Idle-in-transaction backends by application", "Backends in state idle in "
          "transaction (including aborted), by application_name.", "short",
          (Target(f"sum by (application_name) "
                  f"(otel_disconnect_pg_backends{{{D}, {IDLE_IN_TX}}})", "{{application_name}}"),),
          "pg"),
    Panel("Idle in transaction: age by application", "now - state_change of the longest "
          "idle-in-transaction backend per application_name. The session timeout, when set, "
          "caps it.", "s",
          (Target(f"max by (application_name) "
                  f"(otel_disconnect_pg_idle_in_transaction_max_seconds{{{D}}})",
                  "{{application_name}}"),),
          "pg", red_above=300),
    Panel("Oldest transaction by state", "now - xact_start of the oldest transaction per "
          "application and backend state.", "s",
          (Target(f"max by (application_name, state) "
                  f"(otel_disconnect_pg_transaction_max_age_seconds{{{D}}})",
                  "{{application_name}} {{state}}"),),
          "pg"),
    Panel("Orphaned transactions by owner", "owner=\"ended\": the request ended and its "
          "connection leaked. owner=\"disconnected\": the request still runs for nobody.", "short",
          (Target(f"sum by (application_name, owner) "
                  f"(otel_disconnect_pg_orphaned_transactions{{{D}}})",
                  "{{application_name}} {{owner}}"),),
          "pg", red_above=1),
    Panel("Backends by state", "pg_stat_activity backends by state.", "short",
          (Target(f"sum by (state) (otel_disconnect_pg_backends{{{D}}})", "{{state}}"),),
          "pg"),
)

DASHBOARD = Dashboard(
    uid="otel-disconnect-db",
    title="otel-disconnect / Database",
    description="Transactions interrupted by client disconnects, connections left open, and "
                "PostgreSQL's view from pg_stat_activity.",
    panels=PANELS,
    variables=(Variable("route", "Route", "otel_disconnect_requests_total"),
               Variable("datname", "Database", "otel_disconnect_pg_backends")),
)
