"""Talking to a proxy the way no client library would: raw request bytes over a socket (header
bytes that are not UTF-8, malformed HTTP), and `budget-proxy serve` as a real process."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The console script when installed, else the module (a checkout run with PYTHONPATH).
CMD = [shutil.which("budget-proxy")] if shutil.which("budget-proxy") else [sys.executable, "-m", "proxy.cli"]


async def raw_http(host: str, port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are and read the whole answer: (status, lower-cased headers, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def post(path: str, body: bytes, *headers: bytes) -> bytes:
    """A POST with a JSON body and extra header lines, on a connection that closes after it."""
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
            + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body)


async def wait_for_port(port: int, proc, seconds: float = 30) -> None:
    """Until a started `serve` process listens on port; fails if it exits first."""
    for _ in range(int(seconds / 0.05)):
        if proc.returncode is not None:
            raise AssertionError(f"proxy exited with {proc.returncode}: {(await proc.stderr.read()).decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("proxy did not start listening")
