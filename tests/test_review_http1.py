"""Adversarial review of proxy/http1.py on real sockets, under both event loops the proxy runs on
(`serve` picks uvloop when it is installed): each test scripts a raw upstream connection by
connection, so what the client sees (and when) is exact."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import ssl
import struct
import subprocess

import aiohttp
import pytest

from proxy import http1
from proxy.errors import UpstreamBroken, UpstreamIOError

from . import harness

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


@pytest.fixture(params=LOOPS)
def run(request):
    """Run a scenario coroutine on a fresh loop of the parametrised kind."""
    def factory():
        if request.param == "uvloop":
            import uvloop
            return uvloop.new_event_loop()
        return asyncio.new_event_loop()

    async def scenario_then_cleanup(scenario, args):
        client = http1.Client()
        try:
            return await asyncio.wait_for(scenario(client, *args), 60)
        finally:
            await client.close()
            for up in list(Upstream.started):
                up.close()
            Upstream.started.clear()

    def run(scenario, *args):
        """`await scenario(client, *args)`; the client and every Upstream started are closed after."""
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(scenario_then_cleanup(scenario, args))
    return run


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


class Upstream:
    """A raw upstream: `serve(reader, writer)` is the test's script for each connection."""
    started: list["Upstream"] = []

    def __init__(self, serve) -> None:
        self.serve = serve
        self.connections = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> "Upstream":
        Upstream.started.append(self)
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = http1.Url.parse(f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/x")
        return self

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            await self.serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def close(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()


async def until(condition, seconds: float = 5.0) -> None:
    """Wait for a condition on the client's state that no event announces."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def send(client: http1.Client, url: http1.Url, body: bytes = b"{}", read_timeout: float = 5.0):
    return await client.send(url, url.head("POST", {}), body, 5.0, read_timeout)


async def exchange(client: http1.Client, url: http1.Url, **kw) -> tuple[int, bytes]:
    resp = await send(client, url, **kw)
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


# --- a pooled connection must be a readable one ----------------------------------------------

async def _paused_at_the_end(client):
    first = http1.PAUSE_AT - 10
    go = asyncio.Event()

    async def serve(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (first + 20) + b"x" * first)
        await go.wait()
        writer.write(b"y" * 20)          # crosses PAUSE_AT and ends the body in one read
        while True:
            await read_request(reader)
            writer.write(OK)
    up = await Upstream(serve).start()
    resp = await send(client, up.url)
    await until(lambda: resp._unread == first)         # the caller has not read any of it
    go.set()
    await until(lambda: resp._state == http1._DONE)
    assert sum([len(piece) async for piece in resp.iter_any()]) == first + 20
    resp.release()
    # The same connection, from the pool: its answer must be read, not left in the socket.
    assert await exchange(client, up.url, read_timeout=1.0) == (200, b"{}")
    assert up.connections == 1


def test_a_connection_paused_by_a_slow_reader_is_read_again_before_it_is_pooled(run):
    """A stream whose last read both fills the reader's buffer past PAUSE_AT and ends the body
    pooled its connection with reading paused: the next request on it (any tenant's) got no
    answer until its read timeout (600 s by default) and was charged its prompt."""
    run(_paused_at_the_end)


# --- every connection the client made is accounted for ---------------------------------------

async def _cancelled_while_connecting(client):
    async def serve(reader, writer):
        await reader.read()
    up = await Upstream(serve).start()
    for spins in range(12):
        for _ in range(3):
            task = asyncio.ensure_future(send(client, up.url, read_timeout=0.5))
            for _ in range(spins):
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):    # not sent on regardless
                await task
    await until(lambda: not client._open)              # none pooled, none left open


def test_a_request_cancelled_while_connecting_leaves_no_connection_behind(run):
    """Under uvloop a connection whose create_connection is cancelled is closed without
    connection_lost: it stayed in Client._open for ever (one per client that went away while the
    proxy was connecting upstream). And wait_for, the connect timeout, dropped a cancellation
    that came as the connection was made: the request was sent anyway."""
    run(_cancelled_while_connecting)


# --- what an upstream may not put in its head -----------------------------------------------

async def _answered_once(client, answer: bytes):
    async def serve(reader, writer):
        while True:
            await read_request(reader)
            writer.write(answer)
    up = await Upstream(serve).start()
    return await exchange(client, up.url)


@pytest.mark.parametrize("value", [b"a\rb", b"a\nb", b"a\x00b", b"a\x01b", b"a\x1fb", b"a\x7fb"])
def test_a_control_character_in_a_header_is_a_broken_answer(run, value):
    """aiohttp's server refuses to write such a header: passed on, it dropped the proxy's
    connection (non-stream) or sent a 500 framed twice (stream) instead of a 502."""
    answer = b"HTTP/1.1 200 OK\r\nx-request-id: " + value + b"\r\nContent-Length: 2\r\n\r\n{}"
    with pytest.raises(UpstreamBroken):
        run(_answered_once, answer)


def test_tabs_and_bytes_that_are_not_ascii_are_kept(run):
    answer = b"HTTP/1.1 200 \xe9t\xe9\r\nx-request-id: a\tb \xff\r\nContent-Length: 2\r\n\r\n{}"
    assert run(_answered_once, answer) == (200, b"{}")


@pytest.mark.parametrize("status", [b"000", b"099"])
def test_a_status_below_100_is_a_broken_answer(run, status):
    with pytest.raises(UpstreamBroken):
        run(_answered_once, b"HTTP/1.1 " + status + b" X\r\nContent-Length: 2\r\n\r\n{}")


async def raw_upstream(answer: bytes) -> tuple[asyncio.AbstractServer, str]:
    """An upstream answering every request with `answer`, for the proxy: (server, base_url)."""
    async def serve(reader, writer):
        try:
            while True:
                await read_request(reader)
                writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


@pytest.mark.parametrize("stream", [False, True])
async def test_the_proxy_answers_a_header_it_cannot_pass_on_with_a_502(start_proxy, stream):
    ctype = b"text/event-stream" if stream else b"application/json"
    body = b'data: [DONE]\n\n' if stream else b'{"choices": []}'
    server, url = await raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nx-request-id: a\rb\r\n"
                                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
    h = await start_proxy("memory://", provider_options={"base_url": url})
    status, _, answer = await harness.post(h, "/chat/completions",
                                           {"model": "gpt-4o", "messages": harness.MSGS, "stream": stream})
    assert status == 502 and json.loads(answer)["error"]["code"] == "upstream_unavailable"
    (log,) = await h.gateway.ledger.settlements(limit=10)
    assert log.outcome == "upstream_error" and log.usd_micro > 0       # the upstream got the prompt
    server.close()


# --- how an answer may end ---------------------------------------------------------------------

def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0)."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _reset_mid_body(client):
    async def serve(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: {\"a\":")
        await writer.drain()
        await asyncio.sleep(0.05)
        _reset(writer)
    up = await Upstream(serve).start()
    resp = await send(client, up.url)
    try:
        return await resp.read()
    finally:
        resp.release()


def test_a_body_read_to_the_close_that_ends_in_a_reset_is_broken(run):
    """A close-delimited body ends cleanly only with a FIN: a reset means the upstream (or a
    middlebox) broke off, and a cut stream must not be settled as a whole one."""
    with pytest.raises(UpstreamBroken):
        run(_reset_mid_body)


async def _both_lengths(client):
    async def serve(reader, writer):
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\n{}\r\n0\r\n\r\n")
    up = await Upstream(serve).start()
    assert await exchange(client, up.url) == (200, b"{}")
    assert await exchange(client, up.url) == (200, b"{}")
    return up.connections


def test_an_answer_with_both_lengths_is_read_chunked_and_its_connection_closed(run):
    """RFC 9112 6.3: Transfer-Encoding wins, but the message may be a response-splitting
    attempt (something on the way may have framed it by its Content-Length): the connection is
    not trusted with another answer."""
    assert run(_both_lengths) == 2


# --- many tenants on one pool ----------------------------------------------------------------

def _framed(rid: bytes, how: str, rnd) -> tuple[bytes, bool]:
    """An answer carrying the request's id in a header and its body, framed `how`; and whether
    the upstream closes the connection after it."""
    body = b'{"id":"%s","pad":"%s"}' % (rid, b"p" * rnd.randint(0, 3000))
    sized = b"HTTP/1.1 200 OK\r\nX-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (rid, len(body), body)
    chunks = b"".join(b"%x;e=1\r\n%s\r\n" % (len(body[i:i + 700]), body[i:i + 700]) for i in range(0, len(body), 700))
    chunked = b"HTTP/1.1 200 OK\r\nX-Id: %s\r\nTransfer-Encoding: chunked\r\n\r\n%s0\r\nT: 1\r\n\r\n" % (rid, chunks)
    return {"sized": (sized, False), "chunked": (chunked, False),
            "continue": (b"HTTP/1.1 100 Continue\r\n\r\n" + sized, False),
            "to_close": (b"HTTP/1.1 200 OK\r\nX-Id: %s\r\n\r\n%s" % (rid, body), True),
            "close": (sized.replace(b"OK\r\n", b"OK\r\nConnection: close\r\n"), True),
            "extra": (sized + b"GARBAGE", False),                        # never a valid answer
            "cut": (sized[:rnd.randint(0, len(sized) - 1)], True),
            "malformed": (chunked.replace(b"\r\n\r\n", b"\r\n\r\nzz\r\n", 1), True)}[how]


async def _many_tenants(client, seed: int):
    import random
    rnd = random.Random(seed)

    async def serve(reader, writer):
        while True:
            request = await read_request(reader)
            rid, how = request.rpartition(b"\r\n\r\n")[2].split(b":")
            answer, close = _framed(rid, how.decode(), rnd)
            cuts = sorted(rnd.sample(range(1, len(answer)), min(3, len(answer) - 1))) if rnd.random() < 0.5 else []
            for start, end in zip([0] + cuts, cuts + [len(answer)]):
                writer.write(answer[start:end])
                await writer.drain()
                await asyncio.sleep(rnd.random() * 0.002)
            if close or rnd.random() < 0.03:                # and now and then an idle close
                return
    up = await Upstream(serve).start()
    outcomes: dict[str, int] = {}

    async def tenant(i: int) -> None:
        rid = b"t%05d" % i
        how = rnd.choice(["sized", "sized", "chunked", "chunked", "continue", "to_close", "close", "extra",
                          "cut", "malformed"])
        leave = rnd.choice(["read", "stream", "abandon", "cancel"])
        resp = None

        async def call() -> None:
            nonlocal resp
            resp = await send(client, up.url, rid + b":" + how.encode(), read_timeout=2.0)
            if leave == "abandon":
                return
            if leave == "stream":
                got = b"".join([piece async for piece in resp.iter_any()])
            else:
                got = await resp.read()
            assert dict(resp.headers)["X-Id"] == rid.decode() and got.startswith(b'{"id":"%s"' % rid)
            assert got.endswith(b'"}')
        task = asyncio.ensure_future(call())
        if leave == "cancel":
            await asyncio.sleep(rnd.random() * 0.01)
            task.cancel()
        try:
            await task
            outcome = "ok"
        except (asyncio.CancelledError, UpstreamIOError) as exc:
            outcome = type(exc).__name__
        finally:
            if resp is not None:
                resp.release()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    await asyncio.gather(*(tenant(i) for i in range(800)))
    await until(lambda: len(client._open) == sum(map(len, client._idle.values())))   # none left behind
    return outcomes


def test_hundreds_in_flight_each_get_only_their_own_answer(run):
    """800 requests, hundreds at once on one pool, against an upstream that frames answers every
    way, splits them anywhere, cuts, garbles or over-sends some and closes idle connections;
    callers read whole, stream, abandon or are cancelled at random points. Every answer read
    is its own request's (header and body), and every connection is pooled or closed."""
    outcomes = run(_many_tenants, 7)
    assert outcomes["ok"] > 200 and outcomes["UpstreamBroken"] > 50 and outcomes["CancelledError"] > 50


async def test_the_proxy_reaches_an_https_upstream_signed_by_a_private_ca(start_proxy, tmp_path, monkeypatch):
    """End to end: an operator's SSL_CERT_FILE is what the proxy's upstream client trusts, read
    at start-up; the answer comes back through the proxy and is settled."""
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    body = (b'{"id":"c","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"finish_reason":"stop",'
            b'"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":9,"completion_tokens":1,'
            b'"total_tokens":10}}')

    async def serve(reader, writer):
        try:
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(body) + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}/v1"
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    h = await start_proxy("memory://", provider_options={"base_url": url})
    for _ in range(2):
        status, _, answer = await harness.post(h, "/chat/completions", {"model": "gpt-4o", "messages": harness.MSGS})
        assert (status, json.loads(answer)["usage"]["total_tokens"]) == (200, 10)
    (one, two) = await h.gateway.ledger.settlements(limit=10)
    assert one.outcome == two.outcome == "ok"
    server.close()


async def _head_then_post(client):
    async def serve(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 38\r\n\r\n")
        await read_request(reader)
        writer.write(OK)
    up = await Upstream(serve).start()
    resp = await client.send(up.url, up.url.head("HEAD", {}), None, 5.0, 5.0)
    got = (resp.status, await resp.read())
    resp.release()
    return got, await exchange(client, up.url), up.connections


def test_the_answer_to_a_head_has_no_body_whatever_its_length_says(run):
    """aiohttp's router answers HEAD on every GET route, so a client's HEAD /v1/responses/ID
    goes upstream as a HEAD: its answer's Content-Length is the GET's, with no body after it.
    Waiting for that body held the request and an upstream connection for the read timeout
    (600 s by default), then answered 504."""
    assert run(_head_then_post) == ((200, b""), (200, b"{}"), 1)


async def test_a_head_through_the_proxy_is_answered_at_once(start_proxy):
    h = await start_proxy("memory://")
    h.fake.stored["resp_1"] = ({"id": "resp_1", "object": "response"}, [])
    async with aiohttp.ClientSession() as s:
        async with s.head(f"{h.url}/responses/resp_1", headers={"Authorization": f"Bearer {harness.CLIENT_KEY}"},
                          timeout=aiohttp.ClientTimeout(total=5)) as r:
            assert r.status == 200


async def _pooled_then_reset(client):
    async def serve(reader, writer):
        await read_request(reader)
        writer.write(OK)
        await read_request(reader)
        if up.connections == 1:
            _reset(writer)                # an idle close by RST, as the second request came in
            return
        writer.write(OK)
    up = await Upstream(serve).start()
    first = await exchange(client, up.url)
    return first, await exchange(client, up.url), up.connections


def test_a_pooled_connection_reset_without_an_answer_is_sent_again(run):
    """The reset must not turn the idle-close retry (an upstream ending a pooled connection as
    the request went out) into a 502: only a body read to the close is cut short by one."""
    assert run(_pooled_then_reset) == ((200, b"{}"), (200, b"{}"), 2)
