"""A SQLAlchemy engine's URL as a libpq connection string, for the collector's own connection.

The collector connects with psycopg wherever the app's engine connects, whatever driver the
engine uses: a Unix socket directory (``?host=/run/postgresql``), several hosts
(``?host=db1:5432&host=db2:5433``, libpq's multi-host failover), and the libpq options given in
the query (``sslmode``, ``sslrootcert``, ``target_session_attrs``, ...). Driver-only options
(asyncpg's ``prepared_statement_cache_size``, psycopg's ``client_encoding`` ...) are left out;
asyncpg's ``ssl=`` is libpq's ``sslmode``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Connection parameters libpq knows (PostgreSQL 17's list, less host/port/dbname/user/password,
# which the URL carries itself).
LIBPQ_PARAMETERS = frozenset(
    (
        "hostaddr", "passfile", "channel_binding", "connect_timeout", "client_encoding",
        "options", "application_name", "fallback_application_name", "keepalives",
        "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
        "replication", "gssencmode", "sslmode", "requiressl", "sslnegotiation", "sslcompression",
        "sslcert", "sslkey", "sslpassword", "sslcertmode", "sslrootcert", "sslcrl", "sslcrldir",
        "sslsni", "requirepeer", "ssl_min_protocol_version", "ssl_max_protocol_version",
        "krbsrvname", "gsslib", "gssdelegation", "service", "target_session_attrs",
        "load_balance_hosts", "require_auth",
    )
)


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, Iterable) else [str(value)]


def _split_host(item: str) -> tuple[str, str]:
    """``db1:5432`` -> (db1, 5432); a socket directory or a bare host has no port."""
    if item.startswith("/") or item.startswith("@"):
        return item, ""
    if item.startswith("["):  # [::1]:5432
        host, _, rest = item[1:].partition("]")
        return host, rest.lstrip(":")
    host, sep, port = item.rpartition(":")
    if sep and port.isdigit() and host:
        return host, port
    return item, ""


def conninfo_params(url: Any) -> dict[str, str]:
    """libpq keyword parameters for a SQLAlchemy ``URL``."""
    params: dict[str, str] = {}
    query = dict(url.query)
    hosts: list[str] = []
    ports: list[str] = []
    if url.host:
        hosts.append(url.host)
        ports.append(str(url.port) if url.port else "")
    for item in _values(query.pop("host", None)):
        # SQLAlchemy's multi-host form; libpq's own comma lists pass through as they are.
        for part in item.split(","):
            host, port = _split_host(part)
            hosts.append(host)
            ports.append(port)
    query_ports = _values(query.pop("port", None))
    if query_ports and not any(ports):
        ports = ",".join(query_ports).split(",")
    if hosts:
        params["host"] = ",".join(hosts)
    if any(ports):
        params["port"] = ",".join(ports)
    if url.database:
        params["dbname"] = url.database
    if url.username:
        params["user"] = url.username
    if url.password:
        params["password"] = str(url.password)
    ssl = _values(query.pop("ssl", None))
    if ssl and "sslmode" not in query:
        mode = ssl[-1].lower()
        params["sslmode"] = {"true": "require", "false": "disable"}.get(mode, mode)
    for key, value in query.items():
        if key in LIBPQ_PARAMETERS:
            values = _values(value)
            if values:
                params[key] = values[-1]
    return params


def conninfo(url: Any) -> str:
    """The libpq connection string for a SQLAlchemy ``URL`` (quoted by psycopg)."""
    from psycopg.conninfo import make_conninfo

    return str(make_conninfo(**conninfo_params(url)))
