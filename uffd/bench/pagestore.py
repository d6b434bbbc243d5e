"""Page-server micro-benchmark: one page on an idle connection, and TLS against plaintext.

``python -m uffd.bench.pagestore [--json OUT]`` runs, with the server in a
child process (``uffd serve``) and a minimal blocking client here:

- **page latency**: one urgent 4 KiB READ at a time on an otherwise idle
  connection to a 64 MiB snapshot (1 MiB checksummed chunks), warm (the page
  in the page cache) and cold (the file's pages dropped with
  ``posix_fadvise(DONTNEED)`` before each read), with the server
  and the client on the same CPU and on different CPUs; then the same on a
  connection that asks to be a fault channel (protocol version 3: answered
  by the server's C loop off the GIL, as the daemon's fault link is). The floor beside it
  is a minimal asyncio server that answers every 36-byte request with a
  4 KiB reply (the same client, the same placement): the server's own cost
  is the difference.
- **TLS vs plaintext**: a 256 MiB image read whole by a ThreadedPageClient
  (1 MiB READs, pipelined, received in place) from ``uffd serve`` with and
  without TLS (a throwaway self-signed certificate made with the openssl
  CLI), unpinned, interleaved, three runs each.

Figures are medians with the spread; ratios are to the floor measured in
the same run (absolute times move with the host's load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from uffd.pagestore import protocol as p

__all__ = ["main"]

PS = 4096
_FLOOR_SERVER = """
import asyncio, sys
REPLY = bytes(4096 + 40)
async def serve(reader, writer):
    while True:
        data = await reader.readexactly(36)
        writer.write(REPLY)
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(f"listening on tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def _pin(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


@contextmanager
def _child(command: list[str], cpu: int | None) -> Iterator[tuple[str, int]]:
    """A server child printing 'listening on tcp://HOST:PORT'; yields (host, port)."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=_pin(cpu)
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().split()[-1]
        host, port = url.split("://")[1].rsplit(":", 1)
        yield host, int(port)
    finally:
        proc.terminate()
        proc.wait(10)


def _uffd_serve(path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uffd", "serve", str(path), *extra]


def _recv_exact(sock: socket.socket, n: int, buf: memoryview) -> None:
    got = 0
    while got < n:
        k = sock.recv_into(buf[got:n])
        if not k:
            raise ConnectionError("closed")
        got += k


def _page_latencies(
    address: tuple[str, int], n: int, floor: bool, cold: Path | None, faults: bool = False
) -> list[float]:
    """Seconds per request/reply of one 4 KiB page, ``n`` times, one at a time.

    ``faults``: the connection asks to be a fault channel (protocol version 3,
    answered by the server's C loop), as the daemon's fault link does.
    """
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(1 << 16))
    reply = PS + 40  # DATA header + offset + page, then END
    if not floor:
        _recv_exact(sock, p.HEADER.size + 44, buf)  # HELLO
        sock.sendall(p.encode(p.List(faults=faults)))
        head = buf[: p.HEADER.size]
        _recv_exact(sock, p.HEADER.size, head)
        length = p.HEADER.unpack_from(head)[-1]
        _recv_exact(sock, length, buf)
    npages = 16384
    fd = os.open(cold, os.O_RDONLY) if cold is not None else -1
    out = []
    try:
        for i in range(n):
            page = (i * 7919) % npages
            if fd >= 0:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            request = p.encode(p.Read(0, page * PS, PS, True, i + 1))
            start = time.perf_counter()
            sock.sendall(request)
            _recv_exact(sock, reply, buf)
            out.append(time.perf_counter() - start)
    finally:
        if fd >= 0:
            os.close(fd)
        sock.close()
    return out


def _summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50_us": round(values[len(values) // 2] * 1e6, 1),
        "p99_us": round(values[int(len(values) * 0.99)] * 1e6, 1),
    }


def page_latency(image: Path, n: int = 2000) -> dict[str, Any]:
    """Warm and cold one-page latency, same and cross CPU, with the floor (see the module)."""
    cpus = sorted(os.sched_getaffinity(0))
    placements = {"same-cpu": (cpus[0], cpus[0])}
    if len(cpus) > 1:
        placements["cross-cpu"] = (cpus[0], cpus[1])
    results: dict[str, Any] = {}
    here = os.sched_getaffinity(0)
    try:
        for name, (server_cpu, client_cpu) in placements.items():
            os.sched_setaffinity(0, {client_cpu})
            with _child([sys.executable, "-c", _FLOOR_SERVER], server_cpu) as address:
                _page_latencies(address, 200, True, None)
                floor = _page_latencies(address, n, True, None)
            with _child(_uffd_serve(image), server_cpu) as address:
                _page_latencies(address, 200, False, None)
                warm = _page_latencies(address, n, False, None)
                cold = _page_latencies(address, n // 4, False, image)
                _page_latencies(address, 200, False, None, True)
                fault_warm = _page_latencies(address, n, False, None, True)
                fault_cold = _page_latencies(address, n // 4, False, image, True)
            results[name] = {
                "floor": _summary(floor),
                "warm": _summary(warm),
                "cold": _summary(cold),
                "fault_channel_warm": _summary(fault_warm),
                "fault_channel_cold": _summary(fault_cold),
                "warm_over_floor_p50": round(statistics.median(warm) / statistics.median(floor), 2),
                "fault_channel_warm_over_floor_p50": round(
                    statistics.median(fault_warm) / statistics.median(floor), 2
                ),
            }
    finally:
        os.sched_setaffinity(0, here)
    return results


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def _read_all(url: str, length: int, context: ssl.SSLContext | None) -> float:
    """Seconds to read the whole image with 1 MiB READs, 16 in flight, in place."""
    from uffd.pagestore.client import ThreadedPageClient

    out = bytearray(length)
    view = memoryview(out)
    step = 1 << 20
    with ThreadedPageClient(url, ssl=context) as client:
        start = time.perf_counter()
        futures = [
            client.fetch_into("mem", off, view[off : off + step], urgent=False)
            for off in range(0, length, step)
        ]
        for f in futures:
            f.result(120)
        return time.perf_counter() - start


def tls_rate(image: Path, runs: int = 3) -> dict[str, Any]:
    """GB/s reading ``image`` through uffd serve, plaintext and TLS (see the module)."""
    if shutil.which("openssl") is None:
        return {"skipped": "needs the openssl CLI"}
    length = image.stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = _self_signed(Path(tmp))
        context = ssl.create_default_context(cafile=str(cert))
        rates: dict[str, list[float]] = {"plaintext": [], "tls": []}
        for _ in range(runs):
            with _child(_uffd_serve(image), None) as (host, port):
                rates["plaintext"].append(length / _read_all(f"tcp://{host}:{port}", length, None))
            tls = ("--tls-cert", str(cert), "--tls-key", str(key))
            with _child(_uffd_serve(image, *tls), None) as (host, port):
                rates["tls"].append(length / _read_all(f"tls://{host}:{port}", length, context))
    plain, tls_ = statistics.median(rates["plaintext"]), statistics.median(rates["tls"])
    return {
        "bytes": length,
        "plaintext_gbps": [round(r / 1e9, 3) for r in rates["plaintext"]],
        "tls_gbps": [round(r / 1e9, 3) for r in rates["tls"]],
        "tls_over_plaintext": round(tls_ / plain, 2),
        "tls_version": ssl.OPENSSL_VERSION,
    }


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print (or write) the JSON."""
    parser = argparse.ArgumentParser(prog="python -m uffd.bench.pagestore")
    parser.add_argument("--json", metavar="OUT", help="also write the results here")
    parser.add_argument("--mib", type=int, default=256, help="image size for the TLS run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        from uffd.pagestore.snapshot import write_snapshot

        small = Path(tmp) / "pages.snap"
        write_snapshot(small, {"mem": os.urandom(16384 * PS)}, page_size=PS)
        big = Path(tmp) / "big.raw"
        big.write_bytes(os.urandom(args.mib << 20))
        results = {"page_latency": page_latency(small), "tls": tls_rate(big)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
