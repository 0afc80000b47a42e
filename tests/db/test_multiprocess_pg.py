"""Multi-process mode keeps the collectors registered in the process: one scrape of
``uvicorn --workers 2`` shows the PostgreSQL collector's series and both workers' request
counts, each series once."""

from __future__ import annotations

from pathlib import Path

from ..multiproc_server import both_workers, duplicates, scrape, uvicorn_workers, value


def test_one_scrape_has_the_pg_series_and_both_workers_requests_once(
    pg_url: str, tmp_path: Path
) -> None:
    with uvicorn_workers(tmp_path, OTEL_DISCONNECT_TEST_PG_DSN=pg_url) as port:
        _, sent = both_workers(port)
        text = scrape(port)
    assert value(text, "otel_disconnect_pg_up") == 1, text
    pg_series = [line for line in text.splitlines() if line.startswith("otel_disconnect_pg_")]
    assert len(pg_series) > 1, text
    # Both workers' requests, added up, from one worker's answer.
    assert value(text, "otel_disconnect_requests_total", 'method="GET",route="/hello"') == sent
    assert duplicates(text) == [], duplicates(text)
    # This worker's own process figures would pass for the service's: not served.
    assert "process_resident_memory_bytes" not in text
