"""Several worker processes serving one port: `budget-proxy serve --workers N`.

How the port is shared. The parent binds one SO_REUSEPORT listening socket per worker, all on
the same address, then forks the workers, each of which serves its own socket with its own event
loop. Why this and not one socket shared by all: the kernel spreads new connections evenly over
a reuse-port group (by a hash of each connection's addresses), where on one shared socket the
worker that wakes first takes most of them; a port in use or a bad address fails once, in the
parent, before anything starts; and the parent keeps every socket open, so when a worker dies the
connections hashed to its socket wait in that socket's backlog for the replacement instead of
being refused. Workers are forked before they load anything: each loads the tokenizer, opens its
own store connections and runs its own loop (nothing with threads or sockets crosses a fork).

What workers share is the Redis store; the memory store lives inside one process and cannot be
shared, so N > 1 with it is refused. Everything else runs per worker, as it would on separate
hosts: policy reload (each polls the file), lease sweeps, the balance cache, /healthz stats.

Supervision, as an SRE expects of a pre-fork server (gunicorn, nginx): a worker that dies is
logged with its exit status and replaced at once on the same socket. Deaths beyond RESTART_LIMIT
within RESTART_WINDOW_SECONDS are not transient (a crash at start-up, a store that refuses every
connection): the server then stops every worker and exits 1, so the service manager sees the
failure instead of a restart loop. SIGTERM or SIGINT to the parent stops the server: the parent
closes its copies of the sockets, sends SIGTERM to every worker (each finishes its requests and
settlements exactly as a single process does on SIGTERM), waits STOP_SECONDS at most, kills what
is left, and exits 0 when every worker stopped cleanly, 1 otherwise. Workers run in their own
process group, so a terminal's Ctrl-C reaches the parent alone, which stops each worker once;
and they receive SIGTERM if the parent itself is killed (Linux PR_SET_PDEATHSIG): none is orphaned.

Metrics: with N > 1 the command sets PROMETHEUS_MULTIPROC_DIR to a fresh temporary directory
before loading any module that could import prometheus_client (the library picks its storage at
import), unless the operator set it; prometheus_client's multiprocess collector then aggregates
the workers' files, a dead worker's files are marked dead, and a directory the command created is
removed at exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Callable, Iterator, Sequence

log = logging.getLogger("proxy.workers")

RESTART_LIMIT = 5
RESTART_WINDOW_SECONDS = 60.0
STOP_SECONDS = 90.0          # longer than a worker's own bounded shutdown (aiohttp's + the drains)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WATCHED = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
_PR_SET_PDEATHSIG = 1
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"

RunWorker = Callable[[Sequence[socket.socket]], None]


def cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its CPU affinity (which cpusets narrow), and no more than
    its cgroup v2 CPU quota rounded up (a container's `--cpus` or a Kubernetes CPU limit)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:                  # not Linux
        n = os.cpu_count() or 1
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def worker_count(text: str) -> int:
    """`--workers`: a positive integer, or `auto` for one worker per core."""
    if text == "auto":
        return cores()
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        import argparse
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return n


def event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's (`pip install budget-proxy[fast]`) for `uvloop`, and for `auto`
    when it is installed; asyncio's for `asyncio` or when uvloop is not installed."""
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def refusal(store_url: str | None, workers: int, loop: str) -> str | None:
    """Why `serve` cannot run with these options (told before anything starts), or None.
    `store_url` is None when enforcement is disabled: no store, nothing to share."""
    if workers > 1 and store_url and store_url.startswith("memory://"):
        return (f"--workers {workers}: the memory store cannot be shared between workers; "
                f"use a redis:// store or --workers 1")
    try:
        event_loop(loop).close()
    except ImportError:
        return "--loop uvloop: uvloop is not installed (pip install 'budget-proxy[fast]')"
    return None


@contextlib.contextmanager
def metrics_dir(workers: int) -> Iterator[None]:
    """PROMETHEUS_MULTIPROC_DIR for N > 1 workers (see the module docstring); call it before
    importing the app."""
    if workers <= 1 or os.environ.get(METRICS_ENV):
        yield
        return
    if "prometheus_client" in sys.modules:
        log.warning("prometheus_client was imported before %s was set: each worker will report only "
                    "its own metrics", METRICS_ENV)
    path = tempfile.mkdtemp(prefix="budget-proxy-metrics-")
    os.environ[METRICS_ENV] = path
    try:
        yield
    finally:
        os.environ.pop(METRICS_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def _bound(family: int, sockaddr: tuple, port: int, reuse_port: bool) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((sockaddr[0], port, *sockaddr[2:]))
    except OSError:
        s.close()
        raise
    return s


def listen(host: str, port: int, workers: int, backlog: int = 1024) -> list[list[socket.socket]]:
    """For each worker, one SO_REUSEPORT listening socket per address `host` resolves to. Each
    address is first bound once without SO_REUSEPORT and let go, so a port that another server
    holds fails here, even one of another `serve --workers` (which would otherwise join its
    reuse-port group silently and split the traffic). Port 0 picks one port for all workers."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addrs = list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in infos))
    for family, sockaddr in addrs:
        with _bound(family, sockaddr, port, reuse_port=False) as probe:
            port = port or probe.getsockname()[1]
    out: list[list[socket.socket]] = []
    try:
        for _ in range(workers):
            out.append([])
            for family, sockaddr in addrs:
                out[-1].append(_bound(family, sockaddr, port, reuse_port=True))
                out[-1][-1].listen(backlog)
                out[-1][-1].setblocking(False)
    except OSError:
        for s in (s for group in out for s in group):
            s.close()
        raise
    return out


def _exit_text(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with status {code}"


def _mark_dead(pid: int) -> None:
    """Let prometheus_client's multiprocess collector drop a dead worker's live gauges."""
    if os.environ.get(METRICS_ENV):
        with contextlib.suppress(ImportError):
            from prometheus_client import multiprocess
            multiprocess.mark_process_dead(pid)


class Pool:
    """The parent's view of its workers: which pid serves which sockets, and recent deaths."""

    def __init__(self, sockets: list[list[socket.socket]], run: RunWorker) -> None:
        self.sockets = sockets
        self.run = run
        self.pids: dict[int, int] = {}          # pid -> worker index
        self.deaths: collections.deque[float] = collections.deque()
        self.parent = os.getpid()

    def start(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:
            self._child(index)              # never returns
        self.pids[pid] = index
        log.info("worker %d started, pid %d", index, pid)

    def _child(self, index: int) -> None:
        code = 1
        try:
            os.setpgid(0, 0)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != self.parent:      # the parent died before prctl took effect
                os._exit(1)
            for i, group in enumerate(self.sockets):
                if i != index:
                    for s in group:
                        s.close()
            self.run(self.sockets[index])
            code = 0
        except BaseException:                   # noqa: BLE001 - a worker reports, then exits
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(code)

    def reap(self) -> list[tuple[int, int, int]]:
        """(index, pid, wait status) of each worker that has exited since the last call."""
        out = []
        while self.pids:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid in self.pids:
                out.append((self.pids.pop(pid), pid, status))
                _mark_dead(pid)
        return out

    def crash_looping(self) -> bool:
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - RESTART_WINDOW_SECONDS:
            self.deaths.popleft()
        return len(self.deaths) > RESTART_LIMIT

    def stop(self) -> bool:
        """Stop every worker gracefully (see the module docstring); True when all stopped cleanly."""
        for s in (s for group in self.sockets for s in group):
            s.close()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        clean = True
        deadline = time.monotonic() + STOP_SECONDS
        while self.pids and time.monotonic() < deadline:
            signal.sigtimedwait(_WATCHED, min(1.0, max(0.0, deadline - time.monotonic())))
            for index, pid, status in self.reap():
                # SIGTERM's default action stops a worker that was still starting: nothing lost
                clean &= os.waitstatus_to_exitcode(status) in (0, -signal.SIGTERM)
                log.info("worker %d (pid %d) %s", index, pid, _exit_text(status))
        for pid, index in list(self.pids.items()):
            log.error("worker %d (pid %d) still running after %.0f s: killing it", index, pid, STOP_SECONDS)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            clean = False
        self.pids.clear()
        return clean


def supervise(sockets: list[list[socket.socket]], run: RunWorker) -> int:
    """Fork one worker per socket group, keep them running, stop them on SIGTERM/SIGINT; the
    exit status of the server."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    try:
        return _supervise(Pool(sockets, run))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _supervise(pool: Pool) -> int:
    for index in range(len(pool.sockets)):
        pool.start(index)
    while True:
        got = signal.sigtimedwait(_WATCHED, 1.0)
        for index, pid, status in pool.reap():
            if pool.crash_looping():
                log.critical("worker %d (pid %d) %s: more than %d worker deaths within %.0f s; stopping "
                             "the server", index, pid, _exit_text(status), RESTART_LIMIT, RESTART_WINDOW_SECONDS)
                pool.stop()
                return 1
            log.error("worker %d (pid %d) %s; starting a new one", index, pid, _exit_text(status))
            pool.start(index)
        if got is not None and got.si_signo in _STOP_SIGNALS:
            log.info("%s: stopping %d workers", signal.Signals(got.si_signo).name, len(pool.pids))
            return 0 if pool.stop() else 1
