"""proxy/http1.py against real sockets: a scripted raw server answers each request with exactly
the bytes a test gives it, split as the test says, so framing, reuse and failures are exact."""

from __future__ import annotations

import asyncio
import ssl
import subprocess

import pytest

from proxy import http1
from proxy.errors import UpstreamBroken, UpstreamConnectTimeout, UpstreamTimeout, UpstreamUnsent

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Server:
    """Answers request i on any connection with answers[i] (bytes, or a list of byte strings sent
    with a pause between them), then closes the connection if `close_after` says so."""

    def __init__(self, answers, pause: float = 0.01, close_after=()) -> None:
        self.answers = list(answers)
        self.pause = pause
        self.close_after = set(close_after)
        self.connections = 0
        self.hung_up = asyncio.Event()       # a client closed a connection
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> "Server":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> http1.Url:
        return http1.Url.parse(f"{scheme}://{host}:{self.port}/v1/chat/completions")

    async def _read_request(self, reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        self.requests.append(head + await reader.readexactly(length))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await self._read_request(reader)
                i = len(self.requests) - 1
                answer = self.answers[i] if i < len(self.answers) else OK
                for piece in answer if isinstance(answer, list) else [answer]:
                    writer.write(piece)
                    await writer.drain()
                    if isinstance(answer, list):
                        await asyncio.sleep(self.pause)
                if i in self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.hung_up.set()
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


async def _post(client: http1.Client, url: http1.Url, body: bytes = b"{}", read_timeout: float = 5.0):
    head = url.head("POST", {"Content-Type": "application/json"})
    return await client.send(url, head, body, 5.0, read_timeout)


async def _read(client, url, **kw) -> tuple[int, bytes]:
    resp = await _post(client, url, **kw)
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


@pytest.fixture
async def client():
    c = http1.Client()
    yield c
    await c.close()


async def test_a_request_is_one_head_with_its_length_and_the_body(client):
    srv = await Server([OK]).start()
    url = srv.url()
    head = url.head("POST", {"Content-Type": "application/json", "Authorization": "Bearer k"})
    resp = await client.send(url, head + http1.header_line("anthropic-beta", "b1"), b'{"a":1}', 5, 5)
    assert (resp.status, await resp.read()) == (200, b"{}")
    assert srv.requests[0] == (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
                               "Content-Type: application/json\r\nAuthorization: Bearer k\r\n"
                               "anthropic-beta: b1\r\nContent-Length: 7\r\n\r\n{\"a\":1}").encode()
    await srv.stop()


async def test_bodies_split_at_every_byte_are_framed_exactly_and_the_connection_is_reused(client):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
               b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n")
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"
    srv = await Server([_bytewise(chunked), _bytewise(sized), OK], pause=0).start()
    url = srv.url()
    resp = await _post(client, url)
    assert resp.content_type == "text/event-stream"
    assert b"".join([piece async for piece in resp.iter_any()]) == b"hello 0123456789"
    resp.release()
    assert await _read(client, url) == (200, b"hello world")
    assert await _read(client, url) == (200, b"{}")
    assert srv.connections == 1
    await srv.stop()


async def test_a_1xx_answer_is_skipped_and_204_has_no_body(client):
    srv = await Server([b"HTTP/1.1 100 Continue\r\n\r\n" + OK, b"HTTP/1.1 204 No Content\r\n\r\n", OK]).start()
    url = srv.url()
    assert await _read(client, url) == (200, b"{}")
    assert await _read(client, url) == (204, b"")
    assert await _read(client, url) == (200, b"{}")
    assert srv.connections == 1
    await srv.stop()


@pytest.mark.parametrize("answer, body, close_after", [
    # a body without a length runs to the close: that connection cannot be reused
    (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", b"until the end", {0}),
    # the server keeps these connections open: the client must not
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", b"{}", ()),
    # An upstream that sends more than it framed (a bug, or a second answer) must not hand those
    # bytes to the next request on the connection: on a gateway that is another tenant.
    (OK + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned", b"{}", ()),
], ids=["to-the-close", "connection-close", "bytes-after-the-answer"])
async def test_a_connection_that_cannot_be_kept_is_not_reused(client, answer, body, close_after):
    srv = await Server([answer, OK], close_after=close_after).start()
    url = srv.url()
    assert await _read(client, url) == (200, body)
    assert await _read(client, url) == (200, b"{}")
    assert srv.connections == 2
    await srv.stop()


async def test_an_abandoned_answer_closes_its_connection(client):
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    srv = await Server([[big], OK]).start()
    url = srv.url()
    resp = await _post(client, url)
    resp.release()                      # ten body bytes still to come, none read
    await asyncio.wait_for(srv.hung_up.wait(), 1)          # closed at once, not left open
    assert await _read(client, url) == (200, b"{}")
    assert srv.connections == 2
    await srv.stop()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234",                             # cut short
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",                   # cut in a chunk
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",  # int() would take it
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",      # no CRLF after data
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\n folded: header\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/2 200\r\n\r\n",
    b"\x16\x03\x01 not http at all\r\n\r\n",
    # a transfer coding the proxy did not ask for (it sends no TE): passed on, the client would
    # get gzip bytes with nothing saying so
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n{}",
])
async def test_a_broken_answer_is_an_error_and_its_connection_is_dropped(client, answer):
    srv = await Server([answer, OK], close_after={0}).start()
    url = srv.url()
    with pytest.raises(UpstreamBroken):
        resp = await _post(client, url)
        try:
            await resp.read()
        finally:
            resp.release()
    assert await _read(client, url) == (200, b"{}")
    assert srv.connections == 2
    await srv.stop()


@pytest.mark.parametrize("te", [b"chunked", b"identity, chunked", b"Chunked"])
async def test_chunked_is_the_one_transfer_coding_read(client, te):
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n2\r\n{}\r\n0\r\n\r\n" % te
    srv = await Server([answer, OK]).start()
    url = srv.url()
    assert await _read(client, url) == (200, b"{}")
    assert await _read(client, url) == (200, b"{}")
    assert srv.connections == 1          # framed exactly: the connection was reused
    await srv.stop()


async def test_the_read_timeout_counts_from_the_last_arrival(client):
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    trickle = [head] + [b"1\r\nx\r\n"] * 6 + [b"0\r\n\r\n"]
    srv = await Server([trickle, [head, b"1\r\nx\r\n"]], pause=0.15).start()
    url = srv.url()
    # 8 arrivals 0.15 s apart: longer in all than the timeout, never that long between two.
    assert await _read(client, url, read_timeout=0.5) == (200, b"x" * 6)
    resp = await _post(client, url, read_timeout=0.5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(UpstreamTimeout):
        await resp.read()
    assert 0.5 <= loop.time() - start < 2.0
    resp.release()
    await srv.stop()


async def test_no_answer_at_all_times_out_and_is_a_timeout_error(client):
    srv = await Server([[b""] * 1], pause=10).start()
    with pytest.raises(UpstreamTimeout) as info:
        await _post(client, srv.url(), read_timeout=0.3)
    assert isinstance(info.value, asyncio.TimeoutError)
    await srv.stop()


async def test_a_refused_connection_was_never_sent(client):
    srv = await Server([]).start()
    url = srv.url()
    await srv.stop()
    srv.server.close()
    await srv.server.wait_closed()
    with pytest.raises(UpstreamUnsent):
        await _post(client, url)


async def test_a_connect_that_hangs_times_out_as_unsent(client, monkeypatch):
    loop = asyncio.get_running_loop()

    async def never(*a, **k):
        await asyncio.sleep(60)
    monkeypatch.setattr(loop, "create_connection", never)
    url = http1.Url.parse("http://127.0.0.1:9/x")
    with pytest.raises(UpstreamConnectTimeout) as info:
        await client.send(url, url.head("POST", {}), b"{}", 0.2, 5)
    assert isinstance(info.value, UpstreamUnsent) and isinstance(info.value, asyncio.TimeoutError)


async def test_a_pooled_connection_the_upstream_closed_is_not_used_again(client):
    srv = await Server([OK, OK], close_after={0}).start()
    url = srv.url()
    assert await _read(client, url) == (200, b"{}")
    await asyncio.sleep(0.1)            # the server's close arrives while the connection is idle
    assert await _read(client, url) == (200, b"{}")
    assert srv.connections == 2
    await srv.stop()


async def test_a_slow_reader_pauses_the_socket_instead_of_buffering_the_stream(client):
    size = 8 * 1024 * 1024
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    srv = await Server([[head] + [b"x" * 65536] * (size // 65536)], pause=0).start()
    resp = await _post(client, srv.url(), read_timeout=0.3)
    await asyncio.sleep(0.8)             # the reader is away (longer than the read timeout, which is
    #                                      not the upstream's fault); the server keeps writing
    assert resp._paused and resp._unread <= http1.PAUSE_AT + 256 * 1024
    got = 0
    async for piece in resp.iter_any():
        got += len(piece)
    assert got == size
    resp.release()
    await srv.stop()


async def test_a_request_head_cannot_carry_control_characters():
    url = http1.Url.parse("http://h/x")
    with pytest.raises(ValueError):
        url.head("POST", {"X": "a\r\nInjected: 1"})
    with pytest.raises(ValueError):
        http1.header_line("anthropic-beta", "a\nb")
    with pytest.raises(ValueError):
        url.head("GET", {}, target="/x HTTP/1.1\r\nX: y")


def test_urls_are_split_once_with_their_default_ports():
    assert http1.Url.parse("https://api.openai.com/v1/chat/completions") == http1.Url(
        ("https", "api.openai.com", 443), "api.openai.com", "/v1/chat/completions")
    assert http1.Url.parse("http://[::1]:8080/a?b=c") == http1.Url(("http", "::1", 8080), "[::1]:8080", "/a?b=c")
    with pytest.raises(ValueError):
        http1.Url.parse("ftp://h/x")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for localhost, made by the openssl command line."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    return cert, key


async def test_https_is_verified_and_pooled(tls_files, monkeypatch):
    cert, key = tls_files
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    srv = await Server([OK, OK]).start(tls=server_tls)
    untrusting = http1.Client()
    with pytest.raises(UpstreamUnsent):                   # a certificate nobody vouches for
        await _post(untrusting, srv.url("https", "localhost"))
    await untrusting.close()
    monkeypatch.setenv("SSL_CERT_FILE", cert)             # as an operator trusts a private CA
    trusting = http1.Client()
    trusting.tls()
    url = srv.url("https", "localhost")
    assert await _read(trusting, url) == (200, b"{}")
    assert await _read(trusting, url) == (200, b"{}")
    assert srv.connections == 1                           # two requests, one pooled connection
    await trusting.close()
    await srv.stop()


async def test_a_connection_paused_by_a_slow_reader_is_pooled_reading_again(client):
    """The read that pauses a slow reader's socket may also end the answer: the connection then
    goes back to the pool, and the next request on it must not wait on a paused socket."""
    size = http1.PAUSE_AT + 40_000
    srv = await Server([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size, OK]).start()
    url = srv.url()
    resp = await _post(client, url)
    await asyncio.sleep(0.3)                 # the whole body arrives, unread
    assert await resp.read() == b"x" * size
    resp.release()
    assert await _read(client, url, read_timeout=1.0) == (200, b"{}")
    assert srv.connections == 1
    await srv.stop()


class _ClosesSecondRequest(Server):
    """Answers the first request on a connection and closes the connection at the second, as a
    server whose idle timeout fires while that request is on its way."""

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                await self._read_request(reader)
                if served == 1:
                    break
                writer.write(self.answers[0])
                await writer.drain()
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_pooled_connection_closed_as_the_request_went_out_is_retried_once(client):
    srv = await _ClosesSecondRequest([OK]).start()
    url = srv.url()
    assert await _read(client, url) == (200, b"{}")
    assert await _read(client, url) == (200, b"{}")      # closed unanswered, then sent anew
    assert (srv.connections, len(srv.requests)) == (2, 3)
    await srv.stop()


async def test_a_new_connection_closed_without_an_answer_is_not_retried(client):
    srv = await Server([b""], close_after={0}).start()
    with pytest.raises(UpstreamBroken):
        await _post(client, srv.url())
    assert (srv.connections, len(srv.requests)) == (1, 1)
    await srv.stop()


async def test_a_pooled_connection_cut_after_part_of_an_answer_is_not_retried(client):
    srv = await Server([OK, b"HTTP/1.1 200 OK\r\nContent-"], close_after={1}).start()
    url = srv.url()
    assert await _read(client, url) == (200, b"{}")
    with pytest.raises(UpstreamBroken):
        await _post(client, url)
    assert len(srv.requests) == 2
    await srv.stop()
