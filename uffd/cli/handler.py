"""``uffd handler``: the handler daemon (Firecracker's UFFD handshake) from the shell."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import ssl
import sys

from uffd.cli._logging import configure_logging
from uffd.cli._token import UsageError, read_token
from uffd.cli._types import seconds
from uffd.restore.daemon import HandlerDaemon, SourceError, log
from uffd.restore.progress import progress_bars_available


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The page-server client's TLS context from --tls-ca/--tls-cert/--tls-key, or None.

    Raises:
        UsageError: a flag without its pair, a TLS flag on a non-tls:// source,
            or a file that cannot be loaded (the message names it).
    """
    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        return None
    if not args.source.startswith("tls://"):
        raise UsageError("--tls-ca, --tls-cert and --tls-key need a tls://HOST:PORT --source")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    try:
        context = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert is not None:
            context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as err:
        files = ", ".join(f for f in (args.tls_ca, args.tls_cert, args.tls_key) if f)
        raise UsageError(f"cannot load the TLS files ({files}): {err}") from None
    return context


def _cmd_handler(args: argparse.Namespace) -> int:
    configure_logging(args.verbose, "uffd handler: %(levelname)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        token = read_token(args.token_file)
        context = _tls_context(args)
    except UsageError as err:
        print(f"uffd handler: {err}", file=sys.stderr)
        return 2
    if args.progress and not progress_bars_available():
        print(
            "uffd handler: warning: --progress needs tqdm, which is not installed "
            "(pip install 'pyuffd[progress]'); no progress bars",
            file=sys.stderr,
        )
    working_set: str | None = "auto"
    if args.no_working_set:
        working_set = None
    elif args.working_set:
        working_set = args.working_set
    try:
        daemon = HandlerDaemon(
            args.socket,
            args.source,
            token=token,
            ssl=context,
            allow_uids=args.allow_uid,
            fallback=args.fallback,
            deadline=args.deadline,
            prefetch=not args.no_prefetch,
            working_set=working_set,
            progress=args.progress,
            json_reports=args.json,
        )
    except (SourceError, OSError, ValueError) as err:
        # Our own OSErrors carry the whole message (flag and path) as strerror.
        message = str(err)
        if isinstance(err, OSError) and err.filename is None and err.strerror:
            message = err.strerror
        print(f"uffd handler: {message}", file=sys.stderr)
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: daemon.shutdown())
    # A fault's Python step waits for the GIL behind prefetch and the page
    # clients' loops; a shorter switch interval bounds that wait (default 5 ms).
    sys.setswitchinterval(0.0005)
    print(f"listening on {daemon.socket_path}", flush=True)
    try:
        if args.once:
            daemon.start()
            while not daemon.reports and not daemon.stopping:
                with contextlib.suppress(TimeoutError):
                    daemon.wait_reports(1, timeout=0.2)
            reports = list(daemon.reports)
            daemon.close()
            return 0 if reports and all(r.ok for r in reports) else 1
        daemon.serve_forever()
    finally:
        daemon.close()
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``handler`` to the ``uffd`` parser (``args.func(args)`` -> exit code)."""
    p = subparsers.add_parser(
        "handler",
        help="serve other processes' userfaultfds (Firecracker's UFFD handshake) from a snapshot",
        description="Listen on a Unix socket for processes that send their userfaultfd and "
        "a JSON list of regions (Firecracker's handshake: [{base_host_virt_addr, size, offset, "
        "page_size}], page_size_kib accepted too), then restore their memory lazily from "
        "SOURCE: faults are served on demand and the rest is prefetched in the background "
        "(the recorded working set first). Prints 'listening on PATH' once ready and one "
        "summary line per process. The page-server token comes from --token-file or the "
        "UFFD_TOKEN environment variable.",
        epilog="exit codes: 0 stopped by SIGINT/SIGTERM (or --once: a clean session), 1 a "
        "runtime error (source, socket, or a --once session with errors), 2 usage",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on")
    p.add_argument(
        "--source",
        required=True,
        metavar="SNAPSHOT|tcp://HOST:PORT|tls://HOST:PORT|redis://HOST:PORT/NAME",
        help="a snapshot or raw memory file, a page server (tls:// verifies it: --tls-ca), "
        "or a snapshot pushed to Redis "
        "(Cluster) with 'uffd snapshot push' (rediss:// for TLS; docs/chunkstore.md)",
    )
    p.add_argument("--token-file", metavar="F", help="file holding the page server's token")
    p.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA that signed a tls:// page server's certificate (default: the system's CAs)",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS")
    p.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    p.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        metavar="UID",
        help="accept peers with this uid (repeatable); default: this user and root",
    )
    p.add_argument(
        "--fallback",
        choices=("sigbus", "zero"),
        default="sigbus",
        help="how a fault that cannot be served ends (default sigbus: a poison page where the "
        "peer negotiated UFFD_FEATURE_POISON, else a zero page)",
    )
    p.add_argument(
        "--deadline", type=seconds, default=2.0, metavar="S", help="seconds per fault (default 2)"
    )
    p.add_argument("--no-prefetch", action="store_true", help="serve faults only")
    ws = p.add_mutually_exclusive_group()
    ws.add_argument(
        "--working-set",
        metavar="FILE",
        help="working-set file to load and record (default: SNAPSHOT.ws.json for a file source)",
    )
    ws.add_argument("--no-working-set", action="store_true", help="neither load nor record one")
    p.add_argument("--once", action="store_true", help="exit after the first process ends")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: when stderr is a terminal and tqdm is installed)",
    )
    p.add_argument("--json", action="store_true", help="print session reports as JSON lines")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeatable)")
    p.set_defaults(func=_cmd_handler)
