"""Detection delay through real proxies: client close -> disconnect recorded by the package.

    python bench/proxies.py [--trials 20] [--proxies nginx haproxy caddy]

Runs the cells of the README's proxy table (tests/proxy_matrix.py, the same cases the tests
assert) ``--trials`` times each through the Debian nginx, haproxy and caddy binaries to one
uvicorn (httptools) app, and prints a Markdown table: detected in how many trials, and the
delay's median and maximum in ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from tests.apps import Signals, build_app
from tests.conftest import Telemetry
from tests.proxies import SETTINGS, run_proxy
from tests.proxy_matrix import EXPECTED, POINTS, Upstream, run_case
from tests.servers import serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--proxies", nargs="*", default=list(SETTINGS))
    args = parser.parse_args()

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(CollectorRegistry(), provider, exporter)
    signals = Signals()
    app = build_app(signals, cancel_on_disconnect=True, **telemetry.options())
    rows = []
    with serve(app, "uvicorn-httptools") as server:
        upstream = Upstream(server, signals, telemetry)
        for kind in args.proxies:
            for setting in SETTINGS[kind]:
                with run_proxy(kind, server.port, setting) as proxy:
                    cells = []
                    for point in POINTS:
                        expect = EXPECTED[(kind, setting)][point]
                        seen = [
                            run_case(upstream, proxy, point, expect) for _ in range(args.trials)
                        ]
                        delays = [s.delay_s * 1000 for s in seen if s.delay_s is not None]
                        detected = sum(s.detected for s in seen)
                        if not expect.reaches_app:
                            cells.append("not forwarded")
                        elif delays:
                            cells.append(
                                f"{detected}/{len(seen)}: {statistics.median(delays):.1f}"
                                f" / {max(delays):.1f} ms"
                            )
                        else:
                            cells.append(f"{detected}/{len(seen)}")
                    rows.append(f"| {kind} | {setting} | " + " | ".join(cells) + " |")
                    print(rows[-1], flush=True)
    provider.shutdown()
    print("\n| proxy | setting | " + " | ".join(POINTS) + " |")
    print("|---|---|" + "---|" * len(POINTS))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
