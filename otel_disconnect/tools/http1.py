"""A minimal HTTP/1.1 client over asyncio streams, for clients that hang up on purpose.

httpx decides itself when a connection closes; the load generator and the probe need to close
at an exact point (half-way through the request body, before the first byte, after the third
SSE chunk), so they talk HTTP/1.1 on a socket they own. One request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class HTTPError(Exception):
    """The server answered something that is not HTTP/1.1, or closed too early."""


@dataclass
class Target:
    host: str
    port: int
    tls: bool
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls,
                   parts.path.rstrip("/"))

    @property
    def authority(self) -> str:
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False


class Connection:
    """One request on one connection; ``close()`` is the client hanging up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.response = Response()
        self._chunk_left = 0
        self._chunked = False
        self._length: int | None = None

    @classmethod
    async def open(cls, target: Target, timeout: float = 5.0) -> Connection:
        context = ssl.create_default_context() if target.tls else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port, ssl=context), timeout
        )
        return cls(reader, writer)

    async def send_head(self, target: Target, method: str, path: str, length: int | None,
                        headers: dict[str, str] | None = None) -> None:
        lines = [f"{method} {target.base_path}{path} HTTP/1.1", f"Host: {target.authority}",
                 "User-Agent: otel-disconnect", "Accept: */*"]
        if length is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {length}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_head(self) -> Response:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = raw.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HTTPError(f"not an HTTP/1.1 response: {status_line[:80]!r}")
        self.response.status = int(parts[1])
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                self.response.headers[name.strip().lower()] = value.strip()
        self._chunked = "chunked" in self.response.headers.get("transfer-encoding", "").lower()
        length = self.response.headers.get("content-length")
        self._length = int(length) if length is not None else None
        if self._length == 0 or self.response.status in (204, 304):
            self.response.complete = True
        return self.response

    async def read_some(self) -> bytes:
        """The next piece of the body (b"" once it is complete)."""
        if self.response.complete:
            return b""
        if self._chunked:
            data = await self._read_chunk()
        else:
            want = 65536 if self._length is None else self._length - len(self.response.body)
            data = await self.reader.read(min(want, 65536))
            if not data:
                if self._length is not None:
                    raise HTTPError("connection closed in the middle of the body")
                self.response.complete = True
        self.response.body += data
        if self._length is not None and len(self.response.body) >= self._length:
            self.response.complete = True
        return data

    async def _read_chunk(self) -> bytes:
        size_line = await self.reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await self.reader.readuntil(b"\r\n")  # the empty trailer
            self.response.complete = True
            return b""
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def read_all(self) -> Response:
        while not self.response.complete:
            await self.read_some()
        return self.response

    def close(self) -> None:
        """Hang up: a plain close, as a browser tab or a timed-out client does."""
        with contextlib.suppress(Exception):
            self.writer.close()

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
