"""Time to the first `data:` byte of streamed answers, for bench/proxy_bench.py: a blocking
keep-alive HTTP/1.1 client that reads chunked SSE answers as they arrive (no client library in
the way of the timing)."""

from __future__ import annotations

import contextlib
import math
import socket
import time
from dataclasses import dataclass

from measure import BEARER, STREAM_BODY, BenchError


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class TtfbResult:
    p50_ms: float
    p99_ms: float
    mean_ms: float
    n: int
    events: int                 # data events seen in the last answer
    saw_usage_chunk: bool       # any answer carried a usage-only chunk (the client did not ask for one)


class _Conn:
    """A blocking keep-alive HTTP/1.1 client connection, just enough for chunked SSE answers."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self) -> None:
        self.close()
        s = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def _recv(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by peer")
        return data

    def exchange(self, request: bytes, deadline: float) -> tuple[float, bytes]:
        """Send one request; (seconds until the first b'data:' of the body, the whole body)."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        t0 = time.perf_counter()
        self.sock.sendall(request)
        first: float | None = None
        # head
        while b"\r\n\r\n" not in self.buf:
            if time.monotonic() > deadline:
                raise BenchError("TTFB client: timed out reading a response head")
            self.buf += self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        self.buf = rest
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(b":")
            headers[k.strip().lower()] = v.strip().lower()
        body = bytearray()

        def note() -> None:
            nonlocal first
            if first is None and b"data:" in body:
                first = time.perf_counter() - t0

        if headers.get(b"transfer-encoding", b"").endswith(b"chunked"):
            while True:
                while b"\r\n" not in self.buf:
                    if time.monotonic() > deadline:
                        raise BenchError("TTFB client: timed out reading a chunk size")
                    self.buf += self._recv()
                size_line, _, self.buf = self.buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while not self.buf.startswith(b"\r\n") and b"\r\n\r\n" not in self.buf:
                        if time.monotonic() > deadline:
                            raise BenchError("TTFB client: timed out reading trailers")
                        self.buf += self._recv()
                    self.buf = self.buf[2:] if self.buf.startswith(b"\r\n") else \
                        self.buf.partition(b"\r\n\r\n")[2]
                    break
                while len(self.buf) < size + 2:
                    # the part of a chunk already here may hold the first data: bytes
                    if first is None and b"data:" in body + self.buf[:size]:
                        first = time.perf_counter() - t0
                    if time.monotonic() > deadline:
                        raise BenchError("TTFB client: timed out reading a chunk")
                    self.buf += self._recv()
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                note()
        elif b"content-length" in headers:
            n = int(headers[b"content-length"])
            while len(self.buf) < n:
                if time.monotonic() > deadline:
                    raise BenchError("TTFB client: timed out reading a body")
                body += self.buf
                self.buf = b""
                note()
                self.buf += self._recv()
            body += self.buf[:n]
            self.buf = self.buf[n:]
            note()
        else:                                       # read to close
            body += self.buf
            self.buf = b""
            with contextlib.suppress(ConnectionError):
                while time.monotonic() < deadline:
                    note()
                    body += self._recv()
            note()
            self.close()
        if headers.get(b"connection") == b"close":
            self.close()
        if status != 200:
            raise BenchError(f"TTFB client: status {status}: {bytes(body)[:300]!r}")
        if first is None:
            raise BenchError(f"TTFB client: no data: event in the answer: {bytes(body)[:300]!r}")
        return first, bytes(body)


def run_ttfb(port: int, n: int, warmup: int, time_limit: float) -> TtfbResult:
    body = STREAM_BODY.encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {BEARER}\r\nContent-Type: application/json\r\n"
               f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    conn = _Conn(port, timeout=10.0)
    deadline = time.monotonic() + time_limit
    samples: list[float] = []
    last = b""
    usage_chunk = False
    try:
        for i in range(warmup + n):
            if time.monotonic() > deadline:
                raise BenchError(f"TTFB run exceeded {time_limit:.0f} s after {len(samples)} requests")
            t, last = conn.exchange(request, deadline)
            usage_chunk = usage_chunk or b'"choices":[]' in last or b'"choices": []' in last
            if i >= warmup:
                samples.append(t * 1000)
    finally:
        conn.close()
    if not last.rstrip().endswith(b"data: [DONE]"):
        raise BenchError(f"TTFB client: stream did not end with data: [DONE]: {last[-200:]!r}")
    s = sorted(samples)
    return TtfbResult(_percentile(s, 50), _percentile(s, 99), sum(s) / len(s), len(s),
                      last.count(b"data:"), usage_chunk)
