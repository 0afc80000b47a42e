"""A real HTTP/2 client on the ``h2`` library, over h2c (prior knowledge) or TLS (ALPN ``h2``).

One connection, several streams. The test decides exactly what goes on the wire: open streams,
send body data, reset one stream with RST_STREAM (``CANCEL`` by default) while the others stay
open, send GOAWAY, or close the TCP connection. A reader thread feeds the socket into the h2
state machine, returns flow-control credit, and records each stream's headers, body and end.

``make_test_certificate(directory)`` makes a self-signed certificate for 127.0.0.1 with the
``openssl`` binary, at test time.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes


@dataclass
class Stream:
    stream_id: int
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    ended: bool = False  # the server ended it (END_STREAM)
    reset_by_server: ErrorCodes | int | None = None


@dataclass(frozen=True)
class Certificate:
    certfile: Path
    keyfile: Path


def make_test_certificate(directory: Path) -> Certificate:
    """A self-signed certificate for 127.0.0.1 (and localhost), valid for one day."""
    openssl = shutil.which("openssl")
    if openssl is None:
        from tests.conftest import require_binary

        openssl = require_binary("openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return Certificate(cert, key)


class H2Client:
    """An HTTP/2 connection to 127.0.0.1:``port``; ``certificate`` switches to TLS (verified)."""

    def __init__(
        self,
        port: int,
        *,
        certificate: Certificate | None = None,
        authority: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls = certificate is not None
        if certificate is not None:
            context = ssl.create_default_context(cafile=str(certificate.certfile))
            context.set_alpn_protocols(["h2"])
            self.sock: socket.socket = context.wrap_socket(raw, server_hostname="127.0.0.1")
            protocol = self.sock.selected_alpn_protocol()  # type: ignore[attr-defined]
            if protocol != "h2":
                self.sock.close()
                raise AssertionError(f"server did not negotiate h2 over ALPN (got {protocol!r})")
        else:
            self.sock = raw
        # Non-blocking: the I/O thread must never sit in a TLS read while there is data to write
        # (a TLS record that is not application data makes select() say readable).
        self.sock.setblocking(False)
        self.authority = authority or f"127.0.0.1:{port}"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.streams: dict[int, Stream] = {}
        self.goaway_received: h2.events.ConnectionTerminated | None = None
        self.connection_closed = False
        self._cond = threading.Condition()
        self._outgoing = b""
        self._written = 0
        self._io_error: BaseException | None = None
        self._closing = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # The preface goes first, before the I/O thread feeds anything the server sent into h2.
        self.conn.initiate_connection()
        self._outgoing = self.conn.data_to_send()
        self._reader = threading.Thread(target=self._read_loop, name="h2client", daemon=True)
        self._reader.start()

    # -- sending --------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Hand what h2 has to send to the I/O thread and wait until it is on the wire.

        Only the I/O thread touches the socket: an ``ssl`` socket must not be read and written
        from two threads at once. Called with ``self._cond`` held.
        """
        data = self.conn.data_to_send()
        if not data or self.connection_closed:
            return
        self._outgoing += data
        target = self._written + len(self._outgoing)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if threading.current_thread() is self._reader:
            return
        deadline = time.monotonic() + 10
        while self._written < target and not self.connection_closed:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "HTTP/2 client could not write within 10 s"
            self._cond.wait(remaining)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        end_stream: bool = True,
        headers: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Open a stream; with ``end_stream=False`` the body stays open for ``send_data``."""
        scheme = "https" if self.tls else "http"
        request_headers = [
            (":method", method),
            (":path", path),
            (":scheme", scheme),
            (":authority", self.authority),
            *headers,
        ]
        with self._cond:
            stream_id = self.conn.get_next_available_stream_id()
            self.streams[stream_id] = Stream(stream_id)
            only_headers = end_stream and not body
            self.conn.send_headers(stream_id, request_headers, end_stream=only_headers)
            if body or (end_stream and not only_headers):
                self.conn.send_data(stream_id, body, end_stream=end_stream)
            self._flush()
        return stream_id

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        with self._cond:
            self.conn.send_data(stream_id, data, end_stream=end_stream)
            self._flush()

    def reset(self, stream_id: int, error_code: ErrorCodes = ErrorCodes.CANCEL) -> bytes:
        """RST_STREAM on one stream; the connection and its other streams stay open.

        Returns the body received on that stream up to the reset (nothing arrives after it).
        """
        with self._cond:
            received = self.streams[stream_id].body
            self.conn.reset_stream(stream_id, error_code)
            self._flush()
        return received

    def goaway(self, error_code: ErrorCodes = ErrorCodes.NO_ERROR, *, close: bool = True) -> None:
        """Send GOAWAY; then close the connection (``close=True``), as a client that shuts down
        does, or leave it to the server (``close=False``)."""
        with self._cond:
            self.conn.close_connection(error_code)
            self._flush()
        if close:
            self.close()

    def close(self) -> None:
        """Close the TCP connection (every open stream with it)."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._reader.join(timeout=10)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- receiving ------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            self._io()
        except (OSError, ValueError, h2.exceptions.ProtocolError) as exc:
            with self._cond:
                self._io_error = exc
        with self._cond:
            self.connection_closed = True
            self._cond.notify_all()

    def _io(self) -> None:
        while not self._closing:
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0
            if not pending:
                readable, _, _ = select.select([self.sock, self._wake_r], [], [], 1.0)
            else:
                readable = [self.sock]
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            with self._cond:
                outgoing, self._outgoing = self._outgoing, b""
            if outgoing:
                self._send_all(outgoing)
                with self._cond:
                    self._written += len(outgoing)
                    self._cond.notify_all()
            if self.sock in readable:
                try:
                    data = self.sock.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    continue
                if not data:
                    return
                with self._cond:
                    for event in self.conn.receive_data(data):
                        self._handle(event)
                    self._flush()
                    self._cond.notify_all()

    def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                select.select([], [self.sock], [], 1.0)
                continue
            view = view[sent:]

    def _handle(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = [
                (
                    k.decode() if isinstance(k, bytes) else k,
                    v.decode() if isinstance(v, bytes) else v,
                )
                for k, v in event.headers or ()
            ]
            stream.status = int(dict(stream.headers)[":status"])
        elif isinstance(event, h2.events.DataReceived):
            if stream is not None:
                stream.body += event.data or b""
            if event.flow_controlled_length and event.stream_id:
                # Give the credit back at once, so a slow test never stalls a stream.
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset_by_server = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway_received = event

    def wait(self, predicate: Callable[[], object], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (checked under the lock whenever frames arrive)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"HTTP/2 condition not met within {timeout}s; streams: {self.streams}"
                    )
                self._cond.wait(remaining)

    def read_until(self, stream_id: int, marker: bytes, timeout: float = 10.0) -> bytes:
        stream = self.streams[stream_id]
        self.wait(lambda: marker in stream.body or stream.ended or self.connection_closed, timeout)
        assert marker in stream.body, f"{marker!r} not received on stream {stream_id}: {stream}"
        return stream.body

    def response(self, stream_id: int, timeout: float = 10.0) -> Stream:
        """Wait for the stream to end (the server's END_STREAM or RST_STREAM)."""
        stream = self.streams[stream_id]
        self.wait(
            lambda: stream.ended or stream.reset_by_server is not None or self.connection_closed,
            timeout,
        )
        return stream

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def h2_connection(port: int, *, certificate: Certificate | None = None) -> Iterator[H2Client]:
    client = H2Client(port, certificate=certificate)
    try:
        yield client
    finally:
        client.close()
