"""Fleet-wide disconnect events on Redis: one stream per fleet, read by every process.

``events`` is the wire format, ``channel`` the per-process publisher and reader (background tasks,
never on a request's path), ``orphans`` the table of connections left in a transaction that
``otel-disconnect pg-exporter --redis-url`` joins with ``pg_stat_activity``. Imported only when
``redis_url`` is set: redis-py is the optional extra ``[redis]``.
"""
