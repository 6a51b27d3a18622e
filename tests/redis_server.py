"""A real redis-server on a free port, owned by the tests so they can stop and restart it.

pytest-redis would start one too, but its process fixture is session-wide and cannot be stopped
and brought back on the same port inside one test; this is the 40 lines we need instead.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

from proxy.keys import LEASE_ANCHOR

_ANCHOR = LEASE_ANCHOR.encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (Debian/Ubuntu: apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bp-redis-")
        self.proc: subprocess.Popen | None = None
        self._answered = False          # it has run on self.port: a restart must keep that port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait for PONG. On the first start, a port found free can be taken before
        the server binds it (the suite's connections draw source ports from the same range):
        the server exits at once, and it is started on another port. A restart keeps its port."""
        for _ in range(1 if self._answered else 5):
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.dir],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(16).startswith(b"+PONG"):
                            self._answered = True
                            return
                except OSError:
                    time.sleep(0.02)
            if self.proc.poll() is None or self._answered:
                break
            self.port = free_port()                 # it exited: its port was taken
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def command(self, *args: str) -> bytes:
        """Send one inline command; enough for FLUSHALL / SCRIPT FLUSH in tests."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(4096)


def dump_keys(client, skip=lambda key: False) -> dict:
    """Every key of one node (a sync redis-py client) but those `skip` names: key -> (value,
    expiry). Values: a hash's fields, a string, a zset with scores, a set's members, a stream's
    entries without their ids (the server's clock). Expiry: the absolute PEXPIREAT/PXAT time,
    but only whether one is set for a settled record (`SET ... PX`: relative to when it ran).
    A lease index's anchor member (proxy.keys.LEASE_ANCHOR: never due, only there to keep the
    set a skiplist) is left out, and an index holding only it with it: a filler call or an
    earlier reserve leaves it where the compared run's calls might not have made the index,
    and no reader of the index can tell the two apart (tests/stores/test_encodings.py tests it).
    The batch tests compare two runs of the same calls with it."""
    out = {}
    for key in sorted(client.keys("*")):
        if skip(key):
            continue
        kind = client.type(key)
        if kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"string":
            value = client.get(key)
        elif kind == b"zset":
            value = [m for m in client.zrange(key, 0, -1, withscores=True) if m[0] != _ANCHOR]
            if not value:
                continue
        elif kind == b"set":
            value = client.smembers(key)
        elif kind == b"stream":
            value = [fields for _, fields in client.xrange(key)]
        else:
            value = kind
        at = client.pexpiretime(key)
        relative = b"}:r:" in key and value == b"c"
        out[key] = (value, at > 0 if relative else at)
    return out
