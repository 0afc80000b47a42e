"""``otel-disconnect probe URL``: a black-box check of a running service.

It reads the service's ``/metrics``, hangs up on it at chosen points (during the request body,
before the response, mid-stream), reads ``/metrics`` again, and tells what the service did
after each kind of disconnect: was it detected, was the work cancelled, how long did it go on,
how many tokens were generated for nobody. Disconnects the service never saw usually mean a
reverse proxy in between that does not pass client aborts on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from otel_disconnect.tools.http1 import Connection, HTTPError, Target
from otel_disconnect.tools.own_metrics import Reading

PREFIX = "otel_disconnect_"
KINDS = ("request_body", "before_response", "streaming")
DEFAULT_PATH = "/v1/chat/completions"
BODY_AFTER_HEAD_S = 0.25


def default_body(stream: bool) -> bytes:
    return json.dumps({"model": "probe", "stream": stream, "max_tokens": 256, "user": "probe",
                       "messages": [{"role": "user", "content": "otel-disconnect probe"}]}).encode()


class ProbeError(Exception):
    """The probe could not do its job (unreachable, no metrics): one line, exit 2."""


@dataclass
class Attempt:
    kind: str
    premature: bool = True  # False: the response was complete before we hung up
    note: str = ""


@dataclass
class Finding:
    kind: str
    caused: int
    detected: int
    outcomes: dict[str, int]
    not_forwarded: int = 0  # never reached the app (a proxy that buffers the request body)

    @property
    def undetected(self) -> int:
        return max(0, self.caused - self.detected - self.not_forwarded)

    def line(self) -> str:
        if self.caused == 0:
            return f"{self.kind:16} not caused (the service answered before the probe hung up)"
        if self.not_forwarded and not self.undetected:
            return (f"{self.kind:16} caused {self.caused}, never reached the service "
                    f"{self.not_forwarded} (the proxy holds the body), detected {self.detected}"
                    "  ok")
        outcomes = ", ".join(f"{o} {n}" for o, n in sorted(self.outcomes.items()) if n) or "-"
        verdict = "ok" if not self.undetected else "UNDETECTED"
        return (f"{self.kind:16} caused {self.caused}, detected {self.detected} "
                f"(outcomes: {outcomes})  {verdict}")


@dataclass
class Report:
    findings: list[Finding]
    work_after_s: float
    work_after_count: int
    tokens_after: float
    zombies_now: float
    proxy: str | None = None  # recognised from the Server/Via headers

    @property
    def caused(self) -> int:
        return sum(f.caused for f in self.findings)

    @property
    def detected(self) -> int:
        return sum(min(f.detected, f.caused) for f in self.findings)

    @property
    def undetected(self) -> int:
        return sum(f.undetected for f in self.findings)

    @property
    def ok(self) -> bool:
        return self.caused > 0 and self.undetected == 0

    def advice(self) -> list[str]:
        """Which proxy setting to look at, per kind of disconnect that was lost or held."""
        from otel_disconnect.tools.proxy_advice import NOT_FORWARDED, advice

        lines = advice(self.proxy, [f.kind for f in self.findings if f.undetected])
        if any(f.not_forwarded for f in self.findings) and self.proxy in NOT_FORWARDED:
            lines.append(f"request_body: {NOT_FORWARDED[self.proxy]}")
        return lines

    def text(self) -> str:
        lines = [f.line() for f in self.findings]
        mean = self.work_after_s / self.work_after_count if self.work_after_count else 0.0
        lines.append(f"work after disconnect: {self.work_after_s:.2f} s over "
                     f"{self.work_after_count} request(s) (mean {mean * 1000:.0f} ms); "
                     f"still running for nobody: {self.zombies_now:.0f}")
        lines.append(f"LLM tokens generated after disconnect: {self.tokens_after:.0f}")
        return "\n".join(lines)


class Prober:
    def __init__(self, url: str, *, path: str = DEFAULT_PATH, method: str = "POST",
                 body: bytes | None = None, metrics_url: str | None = None,
                 count: int = 3, delay_s: float = 0.2, settle_s: float = 15.0,
                 kinds: tuple[str, ...] = KINDS) -> None:
        self.target = Target.parse(url)
        self.path = path if path.startswith("/") else "/" + path
        self.method = method.upper()
        self.body = body
        self.metrics_url = metrics_url or _join(url, "/metrics")
        self.count = count
        self.delay_s = delay_s
        self.settle_s = settle_s
        self.kinds = kinds
        # Response headers seen (scrapes and the probe's own requests): Server/Via name a proxy.
        self.seen_headers: list[dict[str, str]] = []

    # -- metrics -------------------------------------------------------------------------------

    def scrape(self) -> Reading:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
                text = response.read().decode("utf-8", "replace")
                seen: dict[str, str] = {}
                for header, value in response.headers.items():  # Caddy adds a second Server
                    name = header.lower()
                    seen[name] = f"{seen[name]}, {value}" if name in seen else value
                self.seen_headers.append(seen)
        except urllib.error.HTTPError as exc:
            raise ProbeError(f"cannot read metrics at {self.metrics_url}: HTTP {exc.code} "
                             "(pass --metrics-url)") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ProbeError(f"cannot reach {self.metrics_url}: {reason}") from None
        try:
            return Reading.from_text(text)
        except ValueError as exc:
            raise ProbeError(f"{self.metrics_url} is not a Prometheus exposition: {exc}") from None

    # -- disconnects ---------------------------------------------------------------------------

    def _body(self, stream: bool) -> bytes:
        return self.body if self.body is not None else default_body(stream)

    async def _open(self) -> Connection:
        try:
            return await Connection.open(self.target)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ProbeError(f"cannot connect to {self.target.host}:{self.target.port}: "
                             f"{exc or type(exc).__name__}") from None

    async def request_body(self) -> Attempt:
        body = self._body(stream=False)
        conn = await self._open()
        try:
            await conn.send_head(self.target, self.method, self.path, len(body) + 4096)
            await conn.send(body[: max(1, len(body) // 2)])
            await asyncio.sleep(self.delay_s)
            return Attempt("request_body", premature=not conn.reader.at_eof())
        finally:
            await conn.aclose()

    async def before_response(self) -> Attempt:
        body = self._body(stream=False)
        conn = await self._open()
        try:
            await conn.send_head(self.target, self.method, self.path, len(body))
            # The body a moment after the head, as HTTP clients write a POST. HAProxy's
            # option abortonclose passes a hang-up on for such a request, and not for one
            # that reached it whole in one read (the README's proxy table).
            await asyncio.sleep(BODY_AFTER_HEAD_S)
            await conn.send(body)
            try:
                await asyncio.wait_for(conn.read_head(), self.delay_s)
            except asyncio.TimeoutError:
                return Attempt("before_response")
            return Attempt("before_response", premature=False,
                           note=f"HTTP {conn.response.status} within {self.delay_s} s")
        finally:
            await conn.aclose()

    async def streaming(self) -> Attempt:
        body = self._body(stream=True)
        conn = await self._open()
        try:
            await conn.send_head(self.target, self.method, self.path, len(body))
            await conn.send(body)
            await asyncio.wait_for(conn.read_head(), 30)
            self.seen_headers.append(dict(conn.response.headers))
            await asyncio.wait_for(conn.read_some(), 30)  # the first bytes of the stream
            if conn.response.complete:
                return Attempt("streaming", premature=False, note="the response did not stream")
            return Attempt("streaming")
        except (asyncio.TimeoutError, HTTPError, asyncio.IncompleteReadError) as exc:
            return Attempt("streaming", premature=False, note=f"no stream: {exc!r}")
        finally:
            await conn.aclose()

    async def cause(self) -> list[Attempt]:
        runs: dict[str, Callable[[], object]] = {
            "request_body": self.request_body, "before_response": self.before_response,
            "streaming": self.streaming,
        }
        attempts = []
        for kind in self.kinds:
            for _ in range(self.count):
                attempts.append(await runs[kind]())  # type: ignore[misc]
        return attempts

    # -- the whole check -----------------------------------------------------------------------

    def run(self, progress: Callable[[str], None] = lambda _: None) -> Report:
        before = self.scrape()
        if not before.found:
            raise NoMiddleware(self.metrics_url)
        attempts = asyncio.run(self.cause())
        caused = {k: sum(1 for a in attempts if a.kind == k and a.premature) for k in self.kinds}
        progress(f"caused {sum(caused.values())} disconnect(s); waiting up to {self.settle_s:g} s "
                 "for the service to record them")
        after = self._settle(before, sum(caused.values()))
        findings = []
        for kind in self.kinds:
            b, a = before.outcomes_in(kind), after.outcomes_in(kind)
            outcomes = {o: round(a.get(o, 0.0) - b.get(o, 0.0)) for o in a}
            findings.append(Finding(kind, caused[kind], sum(outcomes.values()), outcomes))
        self._credit_zombies(findings, after.zombies - before.zombies)
        self._credit_not_forwarded(findings, before, after)
        from otel_disconnect.tools.proxy_advice import identify

        return Report(findings, after.work_after_sum - before.work_after_sum,
                      round(after.work_after_count - before.work_after_count),
                      after.tokens_after - before.tokens_after, after.zombies,
                      proxy=identify(reversed(self.seen_headers)))

    def _credit_not_forwarded(self, findings: list[Finding], before: Reading,
                              after: Reading) -> None:
        """Requests the service never counted never reached it: a proxy held their body.

        Told by the probe's method in ``otel_disconnect_requests_total``; not for GET, which the
        scrapes in between also are (and whose request_body kind is rare).
        """
        if self.method == "GET":
            return
        reached = (after.requests_by_method.get(self.method, 0.0)
                   - before.requests_by_method.get(self.method, 0.0))
        unreached = int(sum(f.caused for f in findings) - reached - after.zombies)
        for finding in findings:
            if finding.kind == "request_body" and unreached > 0:
                finding.not_forwarded = min(unreached, finding.caused - finding.detected)

    def _settle(self, before: Reading, caused: int) -> Reading:
        """Counted at the end of each request: wait until they ended (or are zombies)."""
        deadline = time.monotonic() + self.settle_s
        while True:
            after = self.scrape()
            seen = (sum(after.disconnects.values()) - sum(before.disconnects.values())
                    + max(0.0, after.zombies - before.zombies))
            if seen >= caused and after.zombies <= before.zombies:
                return after
            if time.monotonic() > deadline:
                return after
            time.sleep(0.25)

    @staticmethod
    def _credit_zombies(findings: list[Finding], zombies: float) -> None:
        """Requests still running after their client left were detected, just not counted yet."""
        for finding in findings:
            if zombies < 1:
                return
            missing = finding.caused - finding.detected
            take = int(min(max(missing, 0), zombies))
            if take:
                finding.detected += take
                finding.outcomes["still running"] = finding.outcomes.get("still running", 0) + take
                zombies -= take


class NoMiddleware(ProbeError):
    def __init__(self, metrics_url: str) -> None:
        super().__init__(f"{metrics_url} exposes no otel_disconnect_ metrics: is the middleware "
                         "installed (otel_disconnect.instrument_app or DisconnectMiddleware)?")


def _join(url: str, path: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{path}"
