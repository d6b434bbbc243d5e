"""TLS for the page server: restores over TLS, and every wrong certificate refused clearly.

Certificates are made per test session with the ``openssl`` command line (no
runtime dependency): a CA, a server certificate for localhost/127.0.0.1, a
client certificate, a second CA nobody trusts, an expired server certificate
and one for another name.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.rel_common import finish, page_pattern, spawn, wait_until

from uffd.pagestore.client import PageClient, PeerGoneError, ThreadedPageClient
from uffd.pagestore.server import ServerThread
from uffd.pagestore.snapshot import Snapshot, write_snapshot

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

PS = 4096
NPAGES = 256
TOKEN = b"tls-and-a-token"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN={name}", cwd=directory)  # fmt: skip


def make_cert(directory: Path, name: str, ca: str, san: str, days: str = "2") -> None:
    (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=directory)  # fmt: skip
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", days,
            "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA "ca" (server, client, expired, othername) and CA "rogue" (rogue-server)."""
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_ca(directory, "rogue")
    local = "DNS:localhost,IP:127.0.0.1"
    make_cert(directory, "server", "ca", local)
    make_cert(directory, "client", "ca", "DNS:client")
    make_cert(directory, "expired", "ca", local, days="-1")
    make_cert(directory, "othername", "ca", "DNS:elsewhere.example")
    make_cert(directory, "rogue-server", "rogue", local)
    return directory


@pytest.fixture(scope="module")
def snap_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A snapshot of pattern pages, every 5th page zero (as rel_restore_client expects)."""
    data = bytearray(b"".join(page_pattern(i, PS) for i in range(NPAGES)))
    for i in range(0, NPAGES, 5):
        data[i * PS : (i + 1) * PS] = bytes(PS)
    path = tmp_path_factory.mktemp("tls") / "mem.snap"
    write_snapshot(path, {"mem": bytes(data)})
    return path, bytes(data)


def server_context(pki: Path, cert: str = "server", client_ca: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    if client_ca:
        context.load_verify_locations(cafile=pki / "ca.pem")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(pki: Path, ca: str = "ca", cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki / f"{ca}.pem")
    if cert is not None:
        context.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    return context


@pytest.fixture
def tls_server(pki: Path, snap_file: tuple[Path, bytes]) -> Iterator[ServerThread]:
    """A page server with TLS and a token on loopback."""
    with (
        Snapshot.open(snap_file[0]) as snap,
        ServerThread(snap, token=TOKEN, ssl=server_context(pki), handshake_timeout=1.0) as server,
    ):
        yield server


def tls_url(server: ServerThread) -> str:
    return f"tls://127.0.0.1:{server.address[1]}"


def test_lazy_restore_over_tls_verified_page_by_page(
    tls_server: ServerThread, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child process restores the snapshot lazily through userfaultfd from a tls:// URL
    (the CA from SSL_CERT_FILE, as the daemon's client gets it): every page checked."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.pem"))
    url = tls_url(tls_server).replace("127.0.0.1", "localhost")
    tls_server.server.token = None  # the child restores without a token; TLS alone here
    result = finish(spawn("rel_restore_client.py", url, "mem", "3"), 120)
    assert result["bad_pages"] == [] and result["errors"] == 0
    assert result["faults"] >= NPAGES
    assert tls_server.stats.tls_failures == 0 and tls_server.stats.bytes > 0


def test_both_clients_read_every_page_over_tls(
    tls_server: ServerThread, pki: Path, snap_file: tuple[Path, bytes]
) -> None:
    """ThreadedPageClient and PageClient with the CA and the token read back every page."""
    import asyncio

    data = snap_file[1]
    with ThreadedPageClient(tls_url(tls_server), token=TOKEN, ssl=client_context(pki)) as c:
        futures = [c.fetch("mem", i * PS, PS) for i in range(NPAGES)]
        assert [f.result(10) for f in futures] == [
            data[i * PS : (i + 1) * PS] for i in range(NPAGES)
        ]
        assert c.read("mem", 0, len(data), urgent=False) == data

    async def read_all() -> bytes:
        async with await PageClient.connect(
            tls_url(tls_server), token=TOKEN, ssl=client_context(pki)
        ) as client:
            return await client.read("mem", 0, len(data))

    assert asyncio.run(read_all()) == data
    assert not tls_server.server.sendfile_ok


@pytest.mark.parametrize(
    ("cert", "phrase"),
    [
        ("rogue-server", "certificate was refused: unable to get local issuer certificate"),
        ("expired", "certificate was refused: certificate has expired"),
        ("othername", "certificate was refused: IP address mismatch"),
    ],
)
def test_bad_server_certificates_refused(
    pki: Path, snap_file: tuple[Path, bytes], cert: str, phrase: str
) -> None:
    """A server certificate from an unknown CA, expired, or for another name: the client
    refuses with PeerGoneError saying which, and the server counts a failed handshake."""
    with (
        Snapshot.open(snap_file[0]) as snap,
        ServerThread(snap, ssl=server_context(pki, cert), handshake_timeout=1.0) as server,
    ):
        with pytest.raises(PeerGoneError, match=phrase):
            ThreadedPageClient(tls_url(server), ssl=client_context(pki), request_timeout=5)
        wait_until(lambda: server.stats.tls_failures == 1, 5, "the failed handshake counted")


def test_plaintext_client_to_tls_port_refused(tls_server: ServerThread) -> None:
    """A tcp:// client on a TLS port: refused with a hint to use TLS, within the server's
    handshake timeout."""
    with pytest.raises(PeerGoneError, match=r"before its HELLO .*require TLS"):
        ThreadedPageClient(f"tcp://127.0.0.1:{tls_server.address[1]}", request_timeout=5)


def test_tls_client_to_plaintext_port_refused(pki: Path, snap_file: tuple[Path, bytes]) -> None:
    """A tls:// client on a plaintext server: refused, saying the server does not speak TLS."""
    with (
        Snapshot.open(snap_file[0]) as snap,
        ServerThread(snap) as server,
        pytest.raises(PeerGoneError, match="does not speak TLS"),
    ):
        ThreadedPageClient(
            f"tls://127.0.0.1:{server.address[1]}", ssl=client_context(pki), request_timeout=5
        )


def test_mutual_tls_requires_a_client_certificate(pki: Path, snap_file: tuple[Path, bytes]) -> None:
    """With client certificates required (and no token, on 0.0.0.0): a client without one is
    refused, one with a certificate from the CA reads."""
    with (
        Snapshot.open(snap_file[0]) as snap,
        ServerThread(
            snap, host="0.0.0.0", ssl=server_context(pki, client_ca=True), handshake_timeout=1.0
        ) as server,
    ):
        url = tls_url(server)
        with (
            pytest.raises((PeerGoneError, TimeoutError)),
            ThreadedPageClient(url, ssl=client_context(pki), request_timeout=3) as client,
        ):
            client.read("mem", 0, PS)
        with ThreadedPageClient(url, ssl=client_context(pki, cert="client")) as client:
            assert client.read("mem", PS, PS) == snap_file[1][PS : 2 * PS]


def test_serve_cli_with_tls_and_the_plaintext_opt_in(
    pki: Path, snap_file: tuple[Path, bytes], tmp_path: Path
) -> None:
    """``uffd serve --tls-cert --tls-key`` serves TLS; on 0.0.0.0 with a token but no TLS it
    exits 2 naming --insecure-plaintext, and with that flag it starts and warns loudly."""
    import sys

    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN)
    base = [sys.executable, "-m", "uffd", "serve", str(snap_file[0]), "-v"]
    tls = [*base, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    server = subprocess.Popen(tls, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().decode().split()[-1].replace("tcp://", "tls://")
        with ThreadedPageClient(url, ssl=client_context(pki)) as client:
            assert client.read("mem", 0, 4 * PS) == snap_file[1][: 4 * PS]
    finally:
        server.terminate()
        _, err = server.communicate(timeout=10)
    assert b"TLS" in err and b"connected" in err
    public = [*base, "--host", "0.0.0.0", "--token-file", str(token_file)]
    refused = subprocess.run(public, capture_output=True, timeout=30)
    assert refused.returncode == 2 and b"--insecure-plaintext" in refused.stderr
    opted = subprocess.Popen(
        [*public, "--insecure-plaintext"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert opted.stdout is not None
        assert opted.stdout.readline().startswith(b"listening on")
    finally:
        opted.terminate()
        _, err = opted.communicate(timeout=10)
    assert b"WITHOUT TLS" in err


def test_handler_cli_restores_over_mutual_tls(
    pki: Path, snap_file: tuple[Path, bytes], tmp_path: Path
) -> None:
    """``uffd handler --source tls://... --tls-ca --tls-cert --tls-key`` restores a worker
    process from a page server that requires client certificates: every page checked."""
    import sys

    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    from _helpers import DaemonProcess, digests_of, finish_worker, read_digests, spawn_restore

    sock, digests = tmp_path / "h.sock", tmp_path / "digests"
    tls = ["--tls-ca", str(pki / "ca.pem")]
    client = [*tls, "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
    with (
        Snapshot.open(snap_file[0]) as snap,
        ServerThread(snap, ssl=server_context(pki, client_ca=True)) as server,
    ):
        url = f"tls://localhost:{server.address[1]}"
        with DaemonProcess(sock, url, *client, "--no-working-set", log_path=tmp_path / "log") as d:
            result = finish_worker(spawn_restore(sock, NPAGES * PS, digests=digests), 60)
            (report,) = d.reports(1)
        assert read_digests(digests) == digests_of(snap_file[1])
        assert result["sigbus"] == 0 and report["errors"] == []
        assert server.stats.tls_failures == 0
    wrong = subprocess.run(
        [sys.executable, "-m", "uffd", "handler", "--socket", str(sock), "--source", url,
         "--tls-cert", str(pki / "client.pem")],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert wrong.returncode == 2 and b"--tls-cert and --tls-key go together" in wrong.stderr
    plain = subprocess.run(
        [sys.executable, "-m", "uffd", "handler", "--socket", str(sock), "--source",
         str(snap_file[0]), *tls],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert plain.returncode == 2 and b"need a tls://HOST:PORT --source" in plain.stderr
