"""Measuring tools for bench/proxy_bench.py: child processes, wrk, CPU
accounting from /proc, and Redis's INFO over a raw socket (no client library in the way)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
LUA = os.path.join(BENCH_DIR, "wrk_post.lua")
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello in one word."}],
        "max_tokens": 16}
PLAIN_BODY = json.dumps(BODY, separators=(",", ":"))
STREAM_BODY = json.dumps({**BODY, "stream": True}, separators=(",", ":"))
BEARER = "bench"

sys.path.insert(0, REPO)
from tests.redis_server import RedisServer, free_port  # noqa: E402,F401  (re-exported for the bench)


class BenchError(RuntimeError):
    pass


# --- child processes -------------------------------------------------------------------------

class Children:
    """Every process the bench starts; all are ended on exit, errors and Ctrl-C included."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.redis: list[RedisServer] = []
        self.others: list = []          # anything else with a stop() (the local Redis Cluster)

    def start(self, name: str, argv: list[str], *, env=None, log_path: str | None = None,
              cwd: str = REPO) -> subprocess.Popen:
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=cwd, start_new_session=True)
        finally:
            if log_path:
                out.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=5)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5)
        for r in self.redis:
            with contextlib.suppress(Exception):
                if r.proc is not None and r.proc.poll() is None:
                    r.proc.terminate()
                    try:
                        r.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        r.proc.kill()
                        r.proc.wait(timeout=5)
                r.proc = None
            with contextlib.suppress(Exception):
                shutil.rmtree(r.dir, ignore_errors=True)
        self.redis.clear()
        for other in self.others:
            with contextlib.suppress(Exception):
                other.stop()
        self.others.clear()


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pinned(cores: int | str | None, argv: list[str]) -> list[str]:
    """`argv` run on `cores` (a core, or a taskset list such as "0,1"); None: anywhere."""
    return argv if cores is None else ["taskset", "-c", str(cores), *argv]


def wait_port(port: int, proc: subprocess.Popen, what: str, log_path: str | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening"
                             + _log_tail(log_path))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not listen on port {port} within {timeout:.0f} s" + _log_tail(log_path))


def _log_tail(path: str | None, lines: int = 30) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        text = f.read().decode(errors="replace").splitlines()[-lines:]
    return "\n--- " + path + " (tail) ---\n" + "\n".join(text)


# --- tools -----------------------------------------------------------------------------------

def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    print("wrk is not installed; install it with:  apt-get install -y wrk", flush=True)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("trying: apt-get update && apt-get install -y wrk", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, check=False, timeout=300)
        path = shutil.which("wrk")
    if not path:
        raise BenchError("wrk is required: apt-get install -y wrk")
    return path


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


# --- CPU accounting --------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def core_times() -> dict[int, tuple[int, int]]:
    """Per core: (busy ticks, total ticks) since boot, from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+) (.*)", line)
            if m:
                v = [int(x) for x in m.group(2).split()]
                idle = v[3] + (v[4] if len(v) > 4 else 0)
                out[int(m.group(1))] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def busy_fraction(before: dict, after: dict, core: int) -> float:
    b0, t0 = before.get(core, (0, 0))
    b1, t1 = after.get(core, (0, 0))
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def children_of(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live children (a server's workers)."""
    total = 0.0
    for p in [pid, *children_of(pid)]:
        with contextlib.suppress(OSError):
            total += proc_cpu_seconds(p)
    return total


def wait_idle(cores: list[int], limit: float, max_wait: float) -> list[float]:
    """Wait (at most max_wait s) until every core in `cores` is under `limit` busy over 1 s; the last sample."""
    deadline = time.monotonic() + max_wait
    while True:
        a = core_times()
        time.sleep(1.0)
        b = core_times()
        fr = [busy_fraction(a, b, c) for c in cores]
        if all(x < limit for x in fr) or time.monotonic() >= deadline:
            return fr
        print("waiting for a quiet machine: core busy " +
              ", ".join(f"{c}: {100 * x:.0f} %" for c, x in zip(cores, fr)), flush=True)


# --- measurements ----------------------------------------------------------------------------

@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: dict
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_wrk(wrk: str, core: int | None, port: int, seconds: float, connections: int,
            children: Children, body: str = PLAIN_BODY) -> WrkResult:
    argv = pinned(core, [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                         "--timeout", "5s", "-s", LUA, f"http://127.0.0.1:{port}/v1/chat/completions"])
    env = {**os.environ, "BENCH_BODY": body, "BENCH_BEARER": BEARER}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)
    children.procs.append(("wrk", proc))
    try:
        out, _ = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {seconds + 60:.0f} s") from None
    finally:
        children.stop(proc)
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (status {proc.returncode}):\n{text}")
    data = json.loads(line[len("BENCH_JSON "):])
    lat = data["latency_us"]
    return WrkResult(rps=data["requests"] / (data["duration_us"] / 1e6), requests=data["requests"],
                     errors=data["errors"], p50_ms=lat["p50"] / 1000, p90_ms=lat["p90"] / 1000,
                     p99_ms=lat["p99"] / 1000, max_ms=lat["max"] / 1000)


def _json_or_text(data: bytes) -> dict:
    try:
        obj = json.loads(data or b"{}")
    except ValueError:
        return {"text": data[:300].decode(errors="replace")}
    return obj if isinstance(obj, dict) else {"value": obj}


def http_json(port: int, method: str, path: str, body: str | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=body.encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {BEARER}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), _json_or_text(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), _json_or_text(exc.read())
    except (urllib.error.URLError, OSError) as exc:
        raise BenchError(f"request to 127.0.0.1:{port}{path} failed: {exc}") from None


def redis_info(port: int, section: str) -> dict[str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"INFO {section}\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n")
        if not head.startswith(b"$"):
            raise BenchError(f"unexpected redis reply {head!r}")
        n = int(head[1:])
        while len(rest) < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    out = {}
    for ln in rest[:n].decode().splitlines():
        if ":" in ln and not ln.startswith("#"):
            k, _, v = ln.partition(":")
            out[k] = v
    return out


def redis_command(port: int, *args: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall((" ".join(args) + "\r\n").encode())
        return s.recv(4096)


def redis_cpu_seconds(port: int) -> float:
    """The redis-server's own CPU (user + system) since it started."""
    info = redis_info(port, "cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def redis_calls(port: int) -> dict[str, tuple[int, int]]:
    """Per command: (calls, microseconds inside Redis), commands run by scripts included."""
    out = {}
    for k, v in redis_info(port, "commandstats").items():
        fields = dict(kv.split("=", 1) for kv in v.split(","))
        out[k.removeprefix("cmdstat_")] = (int(fields["calls"]), int(fields["usec"]))
    return out


