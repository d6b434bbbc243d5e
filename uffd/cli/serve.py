"""``uffd serve``: the page server from the shell."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import ssl
import sys

from uffd.cli._logging import configure_logging
from uffd.cli._token import UsageError, read_token
from uffd.cli._types import port, positive_int, seconds
from uffd.pagestore.server import PageServer
from uffd.pagestore.snapshot import SnapshotError, open_source


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context from --tls-cert/--tls-key/--tls-client-ca, or None.

    Raises:
        UsageError: a flag without its partner, or a file that cannot be loaded.
    """
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise UsageError("--tls-cert and --tls-key go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca is not None:
            context.load_verify_locations(cafile=args.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as err:
        raise UsageError(
            f"cannot load the TLS files ({args.tls_cert}, {args.tls_key}): {err}"
        ) from None
    return context


def _cmd_serve(args: argparse.Namespace) -> int:
    configure_logging(args.verbose, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = read_token(args.token_file)
        context = _tls_context(args)
    except UsageError as err:
        print(f"uffd serve: {err}", file=sys.stderr)
        return 2
    try:
        # Before any other check: an unresolvable name is the problem to report.
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        print(f"uffd serve: cannot resolve --host {args.host}: {err.strerror}", file=sys.stderr)
        return 1
    try:
        source = open_source(args.snapshot)
    except (SnapshotError, OSError) as err:
        print(f"uffd serve: {err}", file=sys.stderr)
        return 1
    try:
        try:
            server = PageServer(
                source,
                host=args.host,
                port=args.port,
                token=token,
                ssl=context,
                insecure_plaintext=args.insecure_plaintext,
                max_clients=args.max_clients,
                idle_timeout=args.idle_timeout,
                send_timeout=args.send_timeout,
            )
        except ValueError as err:
            print(f"uffd serve: {err}", file=sys.stderr)
            return 2
        return asyncio.run(_serve_until_signal(server))
    except OSError as err:
        print(f"uffd serve: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    finally:
        source.close()


async def _serve_until_signal(server: PageServer) -> int:
    await server.start()
    scheme = "TLS" if server.ssl is not None else "plaintext"
    print(f"listening on {server.url}", flush=True)
    logging.getLogger("uffd.pagestore.server").info(
        "serving %s (%s, %s, at most %d clients)",
        server.source.path,
        scheme,
        "token required" if server.token is not None else "no token",
        server.max_clients,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the ``uffd`` parser.

    Each subcommand sets ``func``: ``args.func(args)`` returns the exit code
    (0 ok, 1 runtime error, 2 usage).
    """
    serve = subparsers.add_parser(
        "serve",
        help="serve a snapshot or raw memory file to page clients over TCP or TLS",
        description="Serve SNAPSHOT (a pyuffd snapshot or a raw memory file) until "
        "SIGINT/SIGTERM. Prints 'listening on tcp://HOST:PORT' once bound. The token, "
        "required off loopback unless clients present certificates, comes from --token-file "
        "or the UFFD_TOKEN environment variable, never from the command line. Off loopback, "
        "TLS (--tls-cert, --tls-key) is required unless --insecure-plaintext is given.",
    )
    serve.add_argument("snapshot", metavar="SNAPSHOT", help="the file to serve")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=port, default=0, help="port (default 0: any free port)")
    serve.add_argument("--token-file", metavar="F", help="file holding the shared token")
    serve.add_argument("--tls-cert", metavar="PEM", help="the server's certificate chain")
    serve.add_argument("--tls-key", metavar="PEM", help="the server certificate's private key")
    serve.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require client certificates signed by these CAs (mutual TLS)",
    )
    serve.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="allow a non-loopback bind without TLS: page data travels in clear and can be "
        "altered on the path (logged as a warning)",
    )
    serve.add_argument(
        "--max-clients",
        type=positive_int,
        metavar="N",
        help="connections at once (default: half the fd limit, 8 to 1024)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=seconds,
        default=30.0,
        metavar="S",
        help="drop a client that sent and received nothing for S seconds (default 30)",
    )
    serve.add_argument(
        "--send-timeout",
        type=seconds,
        default=10.0,
        metavar="S",
        help="drop a client that read nothing of a reply for S seconds (default 10)",
    )
    serve.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log to stderr with timestamps: -v connections, refusals and a summary per "
        "connection; -vv debug",
    )
    serve.set_defaults(func=_cmd_serve)
