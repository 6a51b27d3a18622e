"""The upstream HTTP/1.1 client: pooled keep-alive connections, one write per request, and the
answer's body handed on as it arrives.

Why not aiohttp's ClientSession, which the proxy used before: per request it builds a
ClientRequest, prepares and merges header multidicts, runs its tracing and cookie hooks and
re-arms a read timer on every read: ~70 µs of CPU, half of what a whole bare pass-through costs
(bench/client_bench.py). The proxy knows everything about its upstream requests at start-up
(URL, method, headers but one or two), so the head of a request is one prebuilt byte string plus
a Content-Length, and the answer is framed by a small parser. What the proxy needs and nothing
else: HTTP/1.1 over TCP or TLS, Content-Length, chunked (the one transfer coding accepted) and
close-delimited bodies, 1xx answers skipped, a connect timeout, a read timeout between arrivals,
flow control while a slow client reads a stream. No redirects, cookies, proxies or decompression:
the proxy never wanted them (it asks for identity content encoding and passes any other content
encoding through untouched, with its Content-Encoding header).

A connection goes back to the pool only when its answer was framed exactly, to the last byte,
and neither side asked to close; anything else (a truncated or over-long answer, bytes while
idle, a caller that stopped reading) closes it. An answer can therefore never be read by the
next request on that connection, which on a shared gateway would hand one tenant's bytes to
another.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import UpstreamBroken, UpstreamConnectTimeout, UpstreamTimeout, UpstreamUnsent

# The connect timeout. 3.10's wait_for (and 3.11's) drops a cancellation that comes as the
# connection is made (CPython gh-86296): the request then went upstream for a client that had
# left, 1 in 4 of the cancels in test_review_http1. asyncio.timeout (3.11+) does not.
_timeout = getattr(asyncio, "timeout", None)

MAX_HEAD = 64 * 1024            # an answer's status line and headers
MAX_LINE = 4 * 1024             # a chunk-size or trailer line
PAUSE_AT = 256 * 1024           # unread body bytes at which the socket stops being read ...
RESUME_AT = 64 * 1024           # ... and below which it is read again
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,15})\r\n")       # a chunk's size line without extensions
_DIGITS = re.compile(r"[0-9]{1,18}")
_NO_BODY = frozenset({204, 304})
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")     # in a header or on the request line
# What an answer's head may hold besides its CRLFs: HTAB, SP, VCHAR and obs-text (RFC 9110 5.5).
# A CR, LF or NUL inside a header must not be passed on (aiohttp's server refuses to write one:
# the client got a dropped connection or a malformed 500 instead of our 502).
_FIELD_BYTES = b"\t" + bytes(range(0x20, 0x7f)) + bytes(range(0x80, 0x100))

# Parser states.
_HEAD, _LENGTH, _SIZE, _DATA, _DATA_END, _TRAILER, _TO_EOF, _DONE = range(8)


@dataclass(frozen=True, slots=True)
class Url:
    """An upstream URL, split once at start-up."""
    origin: tuple[str, str, int]     # scheme, host, port: the pool's key
    host_header: str
    target: str                      # path and query, as sent on the request line

    @classmethod
    def parse(cls, url: str) -> "Url":
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        default = port == (443 if parts.scheme == "https" else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls((parts.scheme, host, port), shown if default else f"{shown}:{port}", target)

    def head(self, method: str, headers: dict[str, str], target: str | None = None) -> bytes:
        """The request line and headers every request to this URL starts with (no Content-Length,
        no blank line: `Client.send` adds them)."""
        lines = [f"{method} {target or self.target} HTTP/1.1", f"Host: {self.host_header}"]
        for name, value in headers.items():
            if _UNSAFE.search(name) or _UNSAFE.search(value):
                raise ValueError(f"the {name!r} header holds a character HTTP does not allow there")
            lines.append(f"{name}: {value}")
        if _UNSAFE.search(lines[0]) or " " in (target or self.target):
            raise ValueError("the request target holds a character HTTP does not allow there")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def header_line(name: str, value: str) -> bytes:
    """One more header for a single request (a value the client sent): control characters in it
    would let the client write its own headers, so such a value is refused."""
    if _UNSAFE.search(value):
        raise ValueError(f"the {name} header holds a control character")
    return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")


class _Unanswered(UpstreamBroken):
    """The connection ended (or could not be written) before a byte of the answer came."""


class Client:
    """Pooled connections per origin (scheme, host, port). Idle connections are reused most
    recent first and closed after `keepalive` seconds unused."""

    def __init__(self, keepalive: float = 60.0) -> None:
        self.keepalive = keepalive
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._tls: ssl.SSLContext | None = None
        self._sweep_at = 0.0
        self._closed = False

    def tls(self) -> ssl.SSLContext:
        if self._tls is None:        # loads the system's CA file: a blocking read, done once
            self._tls = ssl.create_default_context()
        return self._tls

    async def send(self, url: Url, head: bytes, body: bytes | None, connect_timeout: float,
                   read_timeout: float) -> "Response":
        """Send one request (`head` from `Url.head`, plus any `header_line`s) and return its answer
        once the status and headers are in. Raises UpstreamUnsent when the request never left
        (nothing reached the upstream), UpstreamTimeout or UpstreamBroken after it may have.

        A pooled connection the upstream closes without a byte of answer is the upstream ending
        an idle connection as the request went out (uvicorn, behind LiteLLM, closes them after
        5 s): the request is sent once more, on a new connection. A server that does that has
        not read it; one that read it and then died without a byte would be billed twice, as
        it would be by the client's own retry of the 502 it would otherwise get (browsers
        resend in this case too)."""
        head += b"Content-Length: %d\r\n\r\n" % len(body) if body is not None else b"\r\n"
        conn = self._reuse(url.origin)
        if conn is not None:
            try:
                return await self._exchange(conn, head, body, read_timeout)
            except _Unanswered:
                pass
        conn = await self._connect(url.origin, connect_timeout)
        return await self._exchange(conn, head, body, read_timeout)

    async def _exchange(self, conn: "_Connection", head: bytes, body: bytes | None,
                        read_timeout: float) -> "Response":
        resp = Response(conn, read_timeout)
        # aiohttp routes a HEAD to every GET route (the pass-through's): its answer has headers only
        resp._head_only = head.startswith(b"HEAD ")
        conn.response = resp
        transport = conn.transport
        try:
            if not body:
                transport.write(head)
            elif len(body) < 16384:
                transport.write(head + body)        # one segment for the usual small JSON body
            else:
                transport.writelines((head, body))
        except (OSError, RuntimeError) as exc:      # part of it may have left
            resp.close()
            raise _Unanswered(f"sending the request failed: {type(exc).__name__}") from None
        resp._arm()
        try:
            return await resp._head_ready()
        except BaseException:
            resp.close()
            raise

    def _reuse(self, origin) -> "_Connection | None":
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            conn.abort()
        return None

    async def _connect(self, origin, timeout: float) -> "_Connection":
        if self._closed:
            raise UpstreamUnsent("the client is closed")
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = self.tls() if scheme == "https" else None
        connecting = loop.create_connection(lambda: _Connection(self, origin, loop), host, port, ssl=tls,
                                            server_hostname=host if tls else None)
        try:
            if _timeout is None:
                _, conn = await asyncio.wait_for(connecting, timeout)
            else:
                async with _timeout(timeout):
                    _, conn = await connecting
        except asyncio.TimeoutError:
            raise UpstreamConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:          # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise UpstreamUnsent(f"could not connect to {host}:{port}: {type(exc).__name__}") from exc
        if conn.lost:                   # closed (or sent bytes unasked) before the request left
            raise UpstreamUnsent(f"{host}:{port} closed the connection at once")
        # Counted as open only now: uvloop closes the transport of a create_connection cancelled
        # after connection_made without calling connection_lost, which would leave it here.
        self._open.add(conn)
        return conn

    def _idle_again(self, conn: "_Connection") -> None:
        if self._closed:
            conn.abort()
            return
        now = conn.loop.time()
        conn.idle_since = now
        self._idle.setdefault(conn.origin, []).append(conn)
        if now >= self._sweep_at:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close connections unused for `keepalive` seconds (they sit at the bottom of the stacks:
        the most recent are reused first). Runs at most every keepalive/4 seconds, on a release."""
        self._sweep_at = now + self.keepalive / 4
        for idle in self._idle.values():
            stale = 0
            while stale < len(idle) and now - idle[stale].idle_since > self.keepalive:
                idle[stale].abort()
                stale += 1
            del idle[:stale]

    def _forget(self, conn: "_Connection") -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()


class _Connection(asyncio.Protocol):
    __slots__ = ("client", "origin", "loop", "transport", "response", "idle_since", "lost")

    def __init__(self, client: Client, origin, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.origin = origin
        self.loop = loop                 # (asyncio.get_running_loop() is a getpid syscall on 3.11)
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.idle_since = 0.0
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def usable(self) -> bool:
        return not self.lost and not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:                 # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        resp._feed(data)

    def eof_received(self):
        self.lost = True
        resp = self.response
        if resp is not None:
            resp._eof()
        return False                     # close the transport

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.client._forget(self)
        resp = self.response
        if resp is not None:
            resp._lost(exc)

    def abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:     # a large request body: the transport buffers it
        pass

    def resume_writing(self) -> None:
        pass


@dataclass(eq=False, slots=True)
class Response:
    """One answer: its status and headers, then its body as it arrives (`read()` for all of it,
    `iter_any()` for what has arrived). `release()` (or `close()`) when done with it."""
    conn: _Connection | None
    read_timeout: float
    status: int = 0
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/octet-stream"
    _state: int = _HEAD
    _head_only: bool = False             # the answer to a HEAD: no body, whatever its length says
    _keep: bool = True
    _buf: bytearray = field(default_factory=bytearray)
    _left: int = 0
    _pieces: list = field(default_factory=list)
    _unread: int = 0
    _paused: bool = False
    _whole: bool = False
    _error: BaseException | None = None
    _waiter: asyncio.Future | None = None
    _last: float = 0.0
    _timer: asyncio.TimerHandle | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _got: bool = False               # any byte of the answer arrived

    # --- the caller's side ---------------------------------------------------------------

    async def read(self) -> bytes:
        """The whole body (the one piece it arrived in, or the pieces joined)."""
        self._whole = True
        if self._paused:
            self._resume()
        while self._state != _DONE:
            await self._wait()
        pieces = self._pieces
        self._pieces = []
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def iter_any(self) -> "Response":
        return self

    def __aiter__(self) -> "Response":
        return self

    async def __anext__(self) -> bytes:
        """What arrived since the last read: one piece as it came, or the few pieces of one read
        joined (as aiohttp's iter_any did), so a write downstream is one chunk."""
        while not self._pieces:
            if self._state == _DONE:
                raise StopAsyncIteration
            await self._wait()
        pieces = self._pieces
        self._pieces = []
        self._unread = 0
        if self._paused:
            self._resume()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def release(self) -> None:
        """Done with the answer. Its connection was pooled already if the answer was whole;
        otherwise (unread body left) the connection is closed."""
        self.close()

    def close(self) -> None:
        if self._state != _DONE:         # (a whole answer has let go of its connection already)
            self._fail(UpstreamBroken("the answer was abandoned"))

    # --- internals -------------------------------------------------------------------------

    async def _head_ready(self) -> "Response":
        while self._state == _HEAD:
            await self._wait()
        return self

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None and self._state != _DONE:
            self._error = error
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.response = None
            conn.abort()
        self._stop_timer()
        self._wake()

    def _arm(self) -> None:
        loop = self._loop = self.conn.loop
        self._last = now = loop.time()
        self._timer = loop.call_at(now + self.read_timeout, self._check_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_timer(self) -> None:
        """The read timeout, checked against the last arrival instead of re-armed on each one
        (a timer per read cost aiohttp ~3 µs a request). Not counted while the caller is slow
        and reading is paused: that wait is the caller's, not the upstream's."""
        loop = self._loop
        now = loop.time()
        if self._paused:
            self._last = now
        due = self._last + self.read_timeout
        if now >= due:
            self._timer = None
            self._fail(UpstreamTimeout(f"no bytes from the upstream for {self.read_timeout:g} s"))
        else:
            self._timer = loop.call_at(due, self._check_timer)

    def _done(self, rest: int) -> None:
        """The answer is framed to its last byte. Its connection goes back to the pool when
        nothing followed it and neither side asked to close."""
        self._state = _DONE
        self._stop_timer()
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.response = None
            if self._paused:             # the read that paused a slow reader also ended the answer
                self._paused = False
                conn.transport.resume_reading()
            if self._keep and not rest and conn.usable():
                conn.client._idle_again(conn)
            else:
                conn.abort()
        self._wake()

    def _eof(self) -> None:
        if self._state == _TO_EOF:
            self._done(0)
        elif self._state == _HEAD and not self._got:
            self._fail(_Unanswered("the upstream closed the connection without answering"))
        elif self._state != _DONE:
            self._fail(UpstreamBroken("the upstream closed the connection before the answer was complete"))

    def _lost(self, exc: BaseException | None) -> None:
        if exc is not None and self._state == _TO_EOF:     # a reset, not the close that ends it
            self._fail(UpstreamBroken(f"the connection to the upstream broke: {type(exc).__name__}"))
        else:                            # (a reset before any answer is an idle close: _eof)
            self._eof()

    def _resume(self) -> None:
        self._paused = False
        conn = self.conn
        if conn is not None and not conn.lost:
            conn.transport.resume_reading()

    def _body(self, piece: bytes) -> None:
        if not piece:
            return
        self._pieces.append(piece)
        if not self._whole:
            self._unread += len(piece)
            if self._unread > PAUSE_AT and not self._paused and self.conn is not None:
                self._paused = True
                self.conn.transport.pause_reading()

    def _feed(self, data: bytes) -> None:
        self._last = self._loop.time()
        self._got = True
        try:
            self._parse(data)
        except UpstreamBroken as exc:
            self._fail(exc)
            return
        except Exception as exc:         # a parser bug must still end the answer, not the loop
            self._fail(UpstreamBroken(f"the upstream's answer could not be read: {type(exc).__name__}"))
            return
        if self._pieces or self._state != _HEAD:
            self._wake()

    def _parse(self, data: bytes) -> None:
        state = self._state
        if state == _HEAD:
            data = self._parse_head(data)
            if data is None:
                return
            state = self._state
        if state == _LENGTH:
            n = len(data)
            left = self._left
            if n < left:
                self._left = left - n
                self._body(data)
            else:
                self._body(data if n == left else data[:left])
                self._done(n - left)
            return
        if state == _TO_EOF:
            if data:
                self._body(data)
            return
        if state == _DONE:
            if data:
                self._fail(UpstreamBroken("bytes after the end of the answer"))
            return
        self._parse_chunked(data)

    def _parse_head(self, data: bytes) -> bytes | None:
        """Collect the status line and headers; on the blank line that ends them, read them and
        return the bytes after it (the body's first), else None."""
        buf = self._buf
        if not buf and (end := data.find(b"\r\n\r\n")) >= 0:
            head, rest = data[:end], data[end + 4:]      # the usual case: a head in one read
        else:
            start = max(0, len(buf) - 3)
            buf += data
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise UpstreamBroken("the answer's headers are too large")
                return None
            head = bytes(buf[:end])
            rest = bytes(buf[end + 4:])
            buf.clear()
        if end > MAX_HEAD:
            raise UpstreamBroken("the answer's headers are too large")
        self._read_head(head)
        if self._state == _HEAD:         # a 1xx answer: the real one follows
            return self._parse_head(rest) if rest else None
        return rest

    def _read_head(self, head: bytes) -> None:
        if head.translate(None, _FIELD_BYTES).replace(b"\r\n", b""):     # ~1 us: one C pass
            raise UpstreamBroken("the upstream's answer has a control character in its head")
        lines = head.decode("utf-8", "surrogateescape").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit() or code[0] == "0":
            raise UpstreamBroken("the upstream's answer is not HTTP/1.1")
        status = int(code)
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamBroken("the upstream switched protocols")
            return                               # 100 Continue, 103 Early Hints: skipped
        headers = []
        length = codings = None
        keep = version == "HTTP/1.1"
        ctype = None
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t" or line[0] in " \t":
                raise UpstreamBroken("the upstream's answer has a malformed header")
            value = value.strip(" \t")
            headers.append((name, value))
            low = name.lower()
            if low == "content-length":
                if not _DIGITS.fullmatch(value) or (length is not None and int(value) != length):
                    raise UpstreamBroken("the upstream's answer has a bad Content-Length")
                length = int(value)
            elif low == "transfer-encoding":             # (several lines are one list)
                codings = (codings or []) + [c for c in (t.strip(" \t").lower() for t in value.split(",")) if c]
            elif low == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                if "close" in tokens:
                    keep = False
                elif "keep-alive" in tokens:
                    keep = True
            elif low == "content-type" and ctype is None:
                ctype = value.partition(";")[0].strip().lower()
        self.status, self.reason, self.headers = status, reason, headers
        if ctype:
            self.content_type = ctype
        self._keep = keep
        if status in _NO_BODY or self._head_only:
            self._state = _LENGTH
            self._left = 0
        elif codings is not None:
            # Transfer-Encoding wins over Content-Length (RFC 9112 6.3). The proxy sends no TE
            # header, so chunked is the only coding an upstream may use (RFC 9112 7.4; the
            # obsolete "identity" is ignored). Any other (gzip, say) is refused: the proxy does
            # not decode it, and passed on without it the body would reach the client compressed
            # with nothing saying so. With a length too, something on the way may have framed
            # it by that (response splitting): the connection carries no further answer.
            codings = [c for c in codings if c != "identity"]
            if codings and codings != ["chunked"]:
                raise UpstreamBroken("the upstream's answer uses a transfer coding the proxy did not ask "
                                     f"for: {', '.join(codings)[:100]}")
            self._state = _SIZE if codings else _TO_EOF
            if not codings or length is not None:
                self._keep = False
        elif length is not None:
            self._state = _LENGTH
            self._left = length
        else:
            self._state = _TO_EOF
            self._keep = False

    def _parse_chunked(self, data: bytes) -> None:
        i, n = 0, len(data)
        state = self._state
        while i < n:
            if state == _SIZE and not self._buf:
                # The usual case, a whole chunk in this read: one match for its size line, one
                # slice for its data. Anything else (split, extensions) takes the general path.
                m = _CHUNK.match(data, i)
                if m is not None:
                    start = m.end()
                    end = start + int(m.group(1), 16)
                    if start < end and data[end:end + 2] == b"\r\n":
                        self._body(data[start:end])
                        i = end + 2
                        continue
            if state == _DATA:
                take = min(self._left, n - i)
                self._body(data if take == n else data[i:i + take])
                i += take
                self._left -= take
                if self._left == 0:
                    state = _DATA_END
                    self._left = 2
                continue
            if state == _DATA_END:        # the CRLF after a chunk's data, maybe split over reads
                take = min(self._left, n - i)
                if data[i:i + take] != b"\r\n"[2 - self._left:2 - self._left + take]:
                    raise UpstreamBroken("the upstream's chunked body is malformed")
                i += take
                self._left -= take
                if self._left == 0:
                    state = _SIZE
                continue
            # _SIZE or _TRAILER: a line
            end = data.find(b"\n", i)
            buf = self._buf
            if end < 0:
                buf += data[i:]
                if len(buf) > MAX_LINE:
                    raise UpstreamBroken("the upstream's chunked body is malformed")
                break
            if buf:
                buf += data[i:end + 1]
                line = bytes(buf)
                buf.clear()
            else:
                line = data[i:end + 1]
            i = end + 1
            if not line.endswith(b"\r\n"):
                raise UpstreamBroken("the upstream's chunked body is malformed")
            line = line[:-2]
            if state == _SIZE:
                size = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    raise UpstreamBroken("the upstream's chunked body is malformed")
                self._left = int(size, 16)
                state = _DATA if self._left else _TRAILER
            elif not line:                # the blank line after the last chunk (and trailers)
                self._state = _DONE
                self._done(n - i)
                return
        self._state = state
