"""A real local Redis Cluster for the tests: three `redis-server --cluster-enabled yes` masters on
free ports, joined with `redis-cli --cluster create` (no replicas, unless asked: the failover
tests give each master one), ready when every node reports `cluster_state:ok` (and every replica
its link to its master up). Started once per test session (forming a cluster takes a second or
two)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

NODES = 3
BUS_OFFSET = 10_000          # a cluster node also listens on its port + 10000 (the cluster bus)


def free_cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free and below 65536 too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + BUS_OFFSET > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        return port


class RedisCluster:
    def __init__(self, replicas: int = 0, node_timeout_ms: int | None = None) -> None:
        self.server, self.cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if self.server is None or self.cli is None:
            raise RuntimeError("redis-server and redis-cli must be on PATH (Debian/Ubuntu: apt-get install redis-server)")
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms      # cluster-node-timeout (Redis's default: 15 s)
        self.ports = [free_cluster_port() for _ in range(NODES * (1 + replicas))]
        self.dir = tempfile.mkdtemp(prefix="bp-cluster-")
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for i in range(len(self.ports)):
            self.procs.append(self._node(i))
        subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        for port in self.ports:
            self._wait(lambda: "cluster_state:ok" in self.command(port, "CLUSTER", "INFO"),
                       f"the cluster did not reach cluster_state:ok on node {port}")
        for port in self.ports:          # a replica not yet in sync cannot be promoted
            self._wait(lambda: ("role:slave" not in (info := self.command(port, "INFO", "replication"))
                                or "master_link_status:up" in info),
                       f"replica {port} did not reach its master")

    def replicated(self, port: int) -> None:
        """Every write master `port` has made is on each of its replicas (its replication offset
        reached by theirs). WAIT cannot say so from another connection: it waits for the
        offset of its own connection's last write, none from a fresh one."""
        info = self.command(port, "INFO", "replication")
        target = int(info.split("master_repl_offset:")[1].split()[0])
        replicas = [int(line.split("port=")[1].split(",")[0]) for line in info.splitlines() if line.startswith("slave")]
        assert replicas, f"node {port} has no replica"
        for replica in replicas:
            self._wait(lambda: int(self.command(replica, "INFO", "replication").split("slave_repl_offset:")[1].split()[0])
                       >= target, f"replica {replica} did not reach master {port}'s offset {target}")

    def kill(self, port: int) -> None:
        """Node `port` killed (SIGKILL: no goodbye to the cluster or its clients), and gone."""
        proc = self.procs[self.ports.index(port)]
        proc.kill()
        proc.wait()

    def _node(self, i: int, attempts: int = 5) -> subprocess.Popen:
        """Node i started and answering PING. A port found free can be taken before the node
        binds it (or its bus port, +10000): the suite's own connections draw their source ports
        from the same range. Such a node exits at once; it is started again on other ports."""
        for _ in range(attempts):
            port = self.ports[i]
            proc = subprocess.Popen(
                [self.server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"{self.dir}/nodes-{port}.conf", "--save", "", "--appendonly", "no",
                 "--dir", self.dir, "--logfile", f"{self.dir}/redis-{port}.log",
                 *(("--cluster-node-timeout", str(self.node_timeout_ms)) if self.node_timeout_ms else ())],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if self.command(port, "PING") == "PONG":
                        return proc
                except (OSError, subprocess.SubprocessError):
                    pass
                time.sleep(0.05)
            if proc.poll() is None:                     # running, but never answered
                proc.kill()
                proc.wait()
                raise RuntimeError(f"node {port} did not start")
            self.ports[i] = free_cluster_port()         # it exited: its port was taken
        raise RuntimeError(f"node {i} did not start in {attempts} attempts (ports taken)")

    def command(self, port: int, *args: str) -> str:
        """One command on one node, through redis-cli (no cluster redirection)."""
        done = subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    def flush(self) -> None:
        for port in self.ports:
            self.command(port, "FLUSHALL")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _wait(ready, message: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.05)
        raise RuntimeError(message)
