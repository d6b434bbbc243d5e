"""Real Redis servers for the chunk-store bench and tests: one node, or a 3+3 cluster.

Each server is Debian's ``redis-server`` on a loopback port in its own
temporary directory (no RDB, no AOF), started as a child process and stopped
(SIGTERM, then SIGKILL) at the end. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
MISSING = (
    None
    if REDIS_SERVER and REDIS_CLI
    else "redis-server/redis-cli not found (apt-get install redis-server)"
)
# A failed master is replaced after this many ms without a reply (the default is 15000).
NODE_TIMEOUT_MS = 1000


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` loopback ports free along with their cluster bus port (+10000).

    Both below Linux's ephemeral range (32768 up), so an outgoing connection
    cannot take one between this check and redis-server's bind.
    """
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    out: list[int] = []
    for _ in range(2000):
        port = rng.randrange(20000, 22768)
        if port not in out and _port_free(port) and _port_free(port + 10000):
            out.append(port)
            if len(out) == count:
                return out
    raise RuntimeError("no free loopback ports for redis-server")


def _ask(port: int, *command: str, timeout: float = 2.0) -> bytes:
    """One command over a raw socket (RESP inline), the first reply's bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((" ".join(command) + "\r\n").encode())
        data = b""
        while not data.endswith(b"\r\n") or (data[:1] == b"$" and data.count(b"\r\n") < 2):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _self_signed(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl), as (cert path, key path)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


class RedisNode:
    """One ``redis-server`` child process on ``port`` (cluster-enabled if asked)."""

    def __init__(
        self, port: int, directory: Path, *, cluster: bool = False, tls_port: int | None = None
    ) -> None:
        assert REDIS_SERVER is not None, MISSING
        self.port = port
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        args = [
            REDIS_SERVER,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(directory / "redis.log"),
        ]  # fmt: skip
        if tls_port is not None:
            cert, key = _self_signed(directory)
            args += [
                "--tls-port", str(tls_port),
                "--tls-cert-file", cert,
                "--tls-key-file", key,
                "--tls-ca-cert-file", cert,
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        if cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(directory / "nodes.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # Replicas sync at once, not after the default 5 s wait for more of them.
                "--repl-diskless-sync-delay", "0",
            ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until it answers PING (bounded)."""
        give_up = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if _ask(self.port, "PING").startswith(b"+PONG"):
                    return
            if self.proc.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"redis-server on port {self.port} did not start: {self.log()}")
            time.sleep(0.02)

    def info(self, *command: str) -> dict[str, str]:
        """``INFO SECTION`` or ``CLUSTER INFO`` (the words given) as a dict."""
        text = _ask(self.port, *command).decode(errors="replace")
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line and line[0] != "#"
        )

    def log(self) -> str:
        """The server's log so far."""
        with contextlib.suppress(OSError):
            return (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        return ""

    def kill(self) -> None:
        """SIGKILL it (a crash) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; reaped."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


class RedisServers:
    """A single node (``url``) or a 3-master + 3-replica cluster, in a temporary directory.

    ``tls``: the single node also listens for TLS; ``tls_url`` is its
    ``rediss://`` URL (trusting its self-signed certificate).
    """

    def __init__(self, *, cluster: bool, tls: bool = False) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="uffd-redis-"))
        self.cluster = cluster
        self.nodes: list[RedisNode] = []
        self.tls_url: str | None = None
        for attempt in range(3):
            try:
                self._start(cluster, tls)
                break
            except RuntimeError:
                # Another program took a port between the check and the bind: new ports.
                for node in self.nodes:
                    node.stop()
                self.nodes = []
                if attempt == 2:
                    self.close()
                    raise
            except BaseException:
                self.close()
                raise
        self.url = f"redis://127.0.0.1:{self.nodes[0].port}"

    def _start(self, cluster: bool, tls: bool) -> None:
        ports = free_ports(6 if cluster else 2 if tls else 1)
        if tls:
            directory = self.tmp / str(ports[0])
            self.nodes.append(RedisNode(ports[0], directory, tls_port=ports[1]))
            self.tls_url = f"rediss://127.0.0.1:{ports[1]}?ssl_ca_certs={directory}/cert.pem"
        else:
            for port in ports:
                self.nodes.append(RedisNode(port, self.tmp / str(port), cluster=cluster))
        if cluster:
            self._create_cluster()

    def _create_cluster(self) -> None:
        assert REDIS_CLI is not None, MISSING
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        done = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "1",
             "--cluster-yes"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-500:]}")
        self.wait_state_ok()

    def wait_state_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node says ``cluster_state:ok`` and knows 3 masters (bounded)."""
        give_up = time.monotonic() + timeout
        while True:
            live = [n for n in self.nodes if n.proc.poll() is None]
            with contextlib.suppress(OSError):
                if all(
                    n.info("CLUSTER", "INFO").get("cluster_state") == "ok" for n in live
                ) and all(len(self.masters(n)) == 3 for n in live):
                    return
            if time.monotonic() > give_up:
                raise RuntimeError("the Redis cluster did not reach cluster_state:ok in time")
            time.sleep(0.05)

    def masters(self, via: RedisNode | None = None) -> list[int]:
        """Ports of the masters that own slots, as ``via`` (default: a live node) sees them."""
        return sorted(self.slots(via))

    def slots(self, via: RedisNode | None = None) -> dict[int, list[tuple[int, int]]]:
        """Each live master's port -> its slot ranges ``(first, last)``, as ``via`` sees them."""
        node = via or next(n for n in self.nodes if n.proc.poll() is None)
        text = _ask(node.port, "CLUSTER", "NODES").decode(errors="replace")
        out: dict[int, list[tuple[int, int]]] = {}
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 8 and "master" in fields[2] and "fail" not in fields[2]:
                port = int(fields[1].split(":")[1].split("@")[0])
                out[port] = [
                    (int(r.split("-")[0]), int(r.split("-")[-1])) for r in fields[8:] if r[0] != "["
                ]
        return out

    def node(self, port: int) -> RedisNode:
        """The node on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def wait_replicated(self, timeout: float = 30.0) -> None:
        """Wait until every replica has every write its master took (bounded)."""
        give_up = time.monotonic() + timeout
        while True:
            behind = []
            for n in self.nodes:
                info = n.info("INFO", "replication")
                if info.get("role") == "master" and int(info.get("connected_slaves", "0")):
                    offset = info.get("master_repl_offset")
                    replicas = [v for k, v in info.items() if k.startswith("slave")]
                    behind += [r for r in replicas if f"offset={offset}," not in r]
            if not behind:
                return
            if time.monotonic() > give_up:
                raise RuntimeError(f"replicas still behind: {behind}")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop every node and remove the directory."""
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def redis_servers(*, cluster: bool, tls: bool = False) -> Iterator[RedisServers]:
    """A single node (with TLS if asked) or a cluster for the ``with`` block."""
    servers = RedisServers(cluster=cluster, tls=tls)
    try:
        yield servers
    finally:
        servers.close()
