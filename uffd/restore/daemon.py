"""The UFFD handler daemon: lazy restore of other processes' memory, Firecracker style.

A process (Firecracker, or anything that speaks its handshake: see
:mod:`uffd.restore.firecracker`) maps its memory, opens a userfaultfd, registers the
memory MISSING, connects to the daemon's Unix socket and sends one message:
a JSON list of regions and, as SCM_RIGHTS, the userfaultfd. The daemon checks
the peer (SO_PEERCRED: the daemon's own uid or root by default, or the
``allow_uids`` given) and starts a session (:mod:`uffd.restore.session`): a
:class:`uffd.FaultHandler` serving the received fd (one made ahead, between
sessions: :class:`uffd.restore.warm.SpareHandler`) serves the process's
faults from the source, while a background thread installs the rest of its
memory, the recorded working set first (``SNAPSHOT.ws.json``: the pages
earlier runs faulted on), then adaptive chunks
(:mod:`uffd.restore.prefetch_thread`).

The source is a snapshot or raw memory file, or a page server
(``tcp://HOST:PORT``), seen as one flat image, its regions laid end to end
in order (:mod:`uffd.restore.sources`); a handshake ``offset`` is a position
in that image (for Firecracker's raw memory file, the file offset). Faults
served from a page server are deferred, so faults from several threads are
fetched at once. A fault outside the handshake's regions is refused and
resolved by the fallback.

Balloon: the peer's MADV_DONTNEED raises a REMOVE event; the FaultHandler
unregisters the range, so later accesses there get zero pages from the
kernel. Prefetch cannot bring old contents back: ``FaultHandler.install``
installs nothing while an event is read but not yet applied, and skips the
range once it is.

Failures never hang the peer: when the source fails (the page server dies,
a read times out), the error is logged once, prefetch stops, and every fault
from then on is resolved by the fallback policy ("sigbus": a poison marker
where the peer negotiated UFFD_FEATURE_POISON, else a zero page; or "zero").
A session ends when its process exits (a pidfd from SO_PEERCRED); the daemon
then writes the working set (the union of the pages faulted on and the one it
loaded) and prints a summary line, or closes its progress bar (tqdm, when
installed and stderr is a terminal).

``python -m uffd handler --socket PATH --source SRC`` runs it (see
``--help``); exit codes: 0 after SIGINT/SIGTERM (or, with ``--once``, after a
clean session), 1 a runtime error (the source cannot be opened, the socket
cannot be bound, a ``--once`` session with errors), 2 a usage error. A page
server that is down is not one: the daemon starts, and its sessions connect
once the server is back.

References: userfaultfd(2), ioctl_userfaultfd(2), unix(7) (SCM_RIGHTS,
SO_PEERCRED), pidfd_open(2).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import queue
import select
import socket
import ssl as _ssl
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterable

import psutil

from uffd._handler import FaultHandler
from uffd.restore.firecracker import (
    GuestRegionUffdMapping,
    HandshakeError,
    PeerCred,
    peer_credentials,
    peer_pidfd,
    recv_handshake,
)
from uffd.restore.prefetch import MAX_CHUNK, WorkingSet, WorkingSetError, working_set_path
from uffd.restore.priority import raise_thread_priority
from uffd.restore.progress import progress_bars_available
from uffd.restore.report import SessionReport, human_size, plural
from uffd.restore.session import RestoreOptions, Session
from uffd.restore.sources import (
    FileSource,
    FlatSource,
    RemoteSource,
    SourceError,
    open_flat_source,
)
from uffd.restore.warm import SpareHandler, WarmSpare

__all__ = [
    "FileSource",
    "HandlerDaemon",
    "RemoteSource",
    "SessionReport",
    "SourceError",
    "open_flat_source",
]

log = logging.getLogger("uffd.restore.daemon")

MAX_HANDSHAKES = 4
"""Handshakes read at once (threads); more connections wait in a queue."""

MAX_QUEUED = 64
"""Connections waiting for a handshake thread; beyond this they are closed (and counted)."""

_SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, without the terminating NUL
_BACKOFF = (0.05, 1.0)  # seconds: first and longest wait after a failed accept()
_LOG_EVERY = 10.0  # seconds: a repeated accept() failure is logged at most this often
_SPARE_CHECK = 60.0  # seconds between the spare handler keeper's looks (nothing to refresh)


class HandlerDaemon:
    """Listens on a Unix socket and restores every process that hands it a userfaultfd.

    ``source``: a path (snapshot or raw memory file), ``tcp://HOST:PORT`` or
    ``tls://HOST:PORT`` (``ssl``: the client context that verifies the page
    server and may carry a client certificate; default the system's CAs), a
    ``redis://`` chunk store, or an already open source (then not closed here,
    nor the spare connections a RemoteSource keeps ready for new sessions).
    ``allow_uids``: peers accepted by SO_PEERCRED uid (default: this
    process's effective uid and root); when given, only those. ``fallback``,
    ``deadline``: as FaultHandler's. ``prefetch``: run the adaptive
    prefetcher. ``working_set``: "auto" (``SNAPSHOT.ws.json`` for a file
    source, none for a page server), a path, or None (neither load nor
    record). ``progress``: a tqdm bar per session (default: when tqdm is
    installed and stderr is a terminal). ``inflight_bytes``: prefetch data
    requested from a page server and not yet received. Each ended session
    prints one line on stdout: its summary, or with ``json_reports`` a JSON
    object ``{"session": {...}}``.

    Calling context: ``serve_forever()`` blocks the calling thread until
    ``shutdown()`` (from any thread or a signal handler); ``start()`` runs it
    on a background thread and returns once the socket listens. Sessions run
    on their own threads. ``close()`` stops everything (idempotent).

    A page server that is down at start is no error (unless ``working_set``
    names a file, checked against it): the daemon starts and logs a warning,
    a keeper thread connects once the server is back, and a session that
    comes before then is refused with the connection error.

    Raises (constructor):
        SourceError: the page server refused us (a token, TLS), or cannot be
            reached while a working set file must be checked against it.
        OSError, ValueError: the source file cannot be opened, the socket
            cannot be bound, a working set file is malformed.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        source: str | FlatSource,
        *,
        token: bytes | None = None,
        ssl: _ssl.SSLContext | None = None,
        allow_uids: Iterable[int] | None = None,
        fallback: str = "sigbus",
        deadline: float = 2.0,
        prefetch: bool = True,
        working_set: str | None = "auto",
        progress: bool | None = None,
        inflight_bytes: int = 16 << 20,
        source_timeout: float = 10.0,
        handshake_timeout: float = 5.0,
        json_reports: bool = False,
    ) -> None:
        if fallback not in ("sigbus", "zero"):
            raise ValueError(f"fallback must be 'sigbus' or 'zero', not {fallback!r}")
        self.socket_path = os.fspath(socket_path)
        self.handshake_timeout = handshake_timeout
        self.json_reports = json_reports
        self.allow_uids = (
            frozenset(allow_uids) if allow_uids is not None else frozenset({os.geteuid(), 0})
        )
        self._owns_source = isinstance(source, str)
        # A page server that is down is no start-up error, unless a working set named
        # for it must be checked against it now: sessions connect once it is back.
        offline_ok = working_set in ("auto", None)
        self.source = (
            open_flat_source(
                source, token=token, timeout=source_timeout, ssl=ssl, offline_ok=offline_ok
            )
            if isinstance(source, str)
            else source
        )
        try:
            self.working_set_file = self._working_set_file(working_set)
            recorded = self._load_working_set(explicit=working_set not in ("auto", None))
            self._sock = self._listen()
            self._sock.setblocking(False)
        except BaseException:
            if self._owns_source:
                self.source.close()
            raise
        if progress is None:
            progress = progress_bars_available() and sys.stderr.isatty()
        self.options = RestoreOptions(
            fallback=fallback,
            deadline=deadline,
            prefetch=prefetch,
            working_set=tuple(recorded.ranges(MAX_CHUNK)),
            inflight_bytes=max(1, inflight_bytes),
            source_timeout=source_timeout,
            progress=progress,
        )
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sessions: list[Session] = []
        self.reports: list[SessionReport] = []
        self.refused: list[str] = []
        self._recorded_lock = threading.Lock()
        self._print_lock = threading.Lock()
        self._recorded = recorded
        self.dropped = 0
        self._pending: queue.Queue[socket.socket | None] = queue.Queue(MAX_QUEUED)
        self._failures = 0
        self._last_logged = -_LOG_EVERY
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # The next session's fault handler, started ahead (serve_forever starts the keeper).
        self._handlers: WarmSpare[SpareHandler] = WarmSpare(
            lambda: SpareHandler(fallback, deadline), label="fault handler", interval=_SPARE_CHECK
        )
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- setup ------------------------------------------------------------------

    def _working_set_file(self, working_set: str | None) -> str | None:
        if working_set == "auto":
            return None if self.source.remote else working_set_path(self.source.label)
        return working_set

    def _load_working_set(self, explicit: bool) -> WorkingSet:
        """The pages earlier runs faulted on (none if there is no file yet): installed first
        by every session, and what this run's faults are added to.

        Checked here, at start-up, not after the first session: a working set
        named with ``--working-set`` must be readable and valid and its
        directory writable. The default one (next to the snapshot) is
        ignored when malformed (this run records a new one) and not recorded
        when its directory is read-only, with a warning.

        Raises:
            WorkingSetError: an explicit working set that cannot be used; the
                message names the flag, the path and the problem.
        """
        path = self.working_set_file
        if path is None:
            # Nothing to load or save; a page server may still be down (its page size
            # unknown): the host's page size does for the faults recorded meanwhile.
            return WorkingSet(self.source.page_size or mmap.PAGESIZE)
        recorded = WorkingSet(self.source.page_size, self.source.length)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
            problem = "does not exist" if not os.path.isdir(directory) else "is not writable"
            if explicit:
                raise WorkingSetError(
                    f"--working-set {path}: the directory {directory} {problem}; create it, "
                    "or pick another path (or --no-working-set)"
                )
            log.warning("not recording a working set: %s %s", directory, problem)
            self.working_set_file = None
        try:
            ws = WorkingSet.load(path, page_size=self.source.page_size, length=self.source.length)
        except FileNotFoundError:
            log.info("no working set at %s yet: this run records one", path)
            return recorded
        except (WorkingSetError, OSError) as err:
            if explicit:
                raise WorkingSetError(f"--working-set {path}: {err}") from None
            log.warning("ignoring the working set: %s", err)
            return recorded
        log.info("working set: %d pages from %s", len(ws), path)
        recorded.update(ws.pages())
        return recorded

    def _listen(self) -> socket.socket:
        """Bind and listen; a stale socket file is replaced, a live one is not.

        The socket is owner-only (0600) unless ``allow_uids`` names other
        users, who must be able to connect (0666); SO_PEERCRED then decides.
        It is bound in a private directory next to ``socket_path``, given its
        mode there and renamed into place, so it never appears with another
        mode and the process-wide umask is left alone (other threads may be
        creating files).

        Raises:
            OSError: the path is taken by a live socket or by something that is
                not a socket, or its directory cannot be written; the message
                names the path.
        """
        path = self.socket_path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                errno.ENOENT, f"--socket {path}: the directory {directory} does not exist"
            )
        if os.path.lexists(path) and not _is_socket(path):
            raise FileExistsError(
                errno.EEXIST,
                f"--socket {path}: the path exists and is not a socket; remove it or pick "
                "another path",
            )
        if _is_socket(path) and _listening(path):
            raise OSError(
                errno.EADDRINUSE,
                f"--socket {path}: another process is serving it; stop it or pick another path",
            )
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise OSError(
                errno.ENAMETOOLONG,
                f"--socket {path}: longer than {_SUN_PATH_MAX} bytes, the limit of a Unix "
                "socket path; pick a shorter one",
            )
        try:
            private = tempfile.mkdtemp(prefix=".uffd-handler-", dir=directory)
        except OSError as err:
            raise OSError(
                err.errno, f"--socket {path}: cannot create it in {directory}: {err.strerror}"
            ) from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        dir_fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Bound through the directory's fd: the name stays short whatever the path.
            sock.bind(f"/proc/self/fd/{dir_fd}/s")
            others = self.allow_uids - {os.geteuid(), 0}
            os.chmod("s", 0o666 if others else 0o600, dir_fd=dir_fd)
            os.replace("s", path, src_dir_fd=dir_fd)
            sock.listen(128)
        except OSError as err:
            sock.close()
            raise OSError(err.errno, f"--socket {path}: {err.strerror}") from None
        except BaseException:
            sock.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink("s", dir_fd=dir_fd)
            os.close(dir_fd)
            os.rmdir(private)
        return sock

    # -- serving -------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept connections until ``shutdown()``; handshakes run on ``MAX_HANDSHAKES`` threads.

        Nothing a peer does ends it: a failed ``accept()`` (EMFILE when the
        process is out of fds, ENFILE, ENOMEM...) is logged (at most every
        10 s, with how many failed) and retried after a back-off that grows
        from 50 ms to 1 s; connections beyond ``MAX_QUEUED`` waiting for a
        handshake thread are closed and counted (``dropped``).
        """
        # Faults first: the threads started from here on (handshakes, sessions, fault
        # handlers, page clients, prefetch) inherit this thread's priority.
        raise_thread_priority()
        if isinstance(self.source, RemoteSource):
            self.source.warm()  # the first session's connections, ready before it comes
        self._handlers.start()  # and its fault handler
        workers = [
            threading.Thread(target=self._handshakes, name="uffd-handshake", daemon=True)
            for _ in range(MAX_HANDSHAKES)
        ]
        for worker in workers:
            worker.start()
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        backoff = 0.0
        try:
            while not self._stopping:
                for fd, _ in poller.poll(backoff * 1000 if backoff else None):
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 64)
                if self._stopping:
                    break
                backoff = self._accept(backoff)
        finally:
            for _ in workers:
                self._pending.put(None)
            self._end_sessions()
            self._handlers.close()

    def _accept(self, backoff: float) -> float:
        """Accept what is waiting; the back-off (seconds) before the next try, 0 for none."""
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return 0.0
            except OSError as err:
                if err.errno == errno.ECONNABORTED:
                    continue
                self._accept_failed(err)
                return min(_BACKOFF[1], max(_BACKOFF[0], backoff * 2))
            try:
                self._pending.put_nowait(conn)
            except queue.Full:
                conn.close()
                with self._cond:
                    self.dropped += 1
                self._accept_failed(None)

    def _accept_failed(self, err: OSError | None) -> None:
        """Log a failed accept (or a dropped connection), at most every ``_LOG_EVERY`` s."""
        now = time.monotonic()
        self._failures += 1
        if now - self._last_logged < _LOG_EVERY:
            return
        what = (
            f"accept() failed: {err.strerror} ({errno.errorcode.get(err.errno or 0, err.errno)})"
            if err is not None
            else f"more than {MAX_QUEUED} connections wait for a handshake; closing new ones"
        )
        log.warning(
            "%s; %d times since the last report; backing off and carrying on "
            "(sessions are not affected)",
            what,
            self._failures,
        )
        self._failures = 0
        self._last_logged = now

    def _handshakes(self) -> None:
        """A handshake thread: read queued connections' handshakes until ``None``."""
        while (conn := self._pending.get()) is not None:
            self._handshake(conn)

    def start(self) -> HandlerDaemon:
        """Run ``serve_forever`` on a background thread (the socket already listens)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.serve_forever, name="uffd-daemon", daemon=True
            )
            self._thread.start()
        return self

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` or :meth:`close` has been called."""
        return self._stopping

    def shutdown(self) -> None:
        """Make ``serve_forever`` return (safe from signal handlers and other threads)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Shut down, end every session, close the socket and the source (idempotent)."""
        if self._closed:
            return
        self.shutdown()
        if self._thread is not None:
            self._thread.join(30.0)
        else:
            self._end_sessions()
        self._handlers.close()
        self._closed = True
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._owns_source:
            self.source.close()

    def __enter__(self) -> HandlerDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _end_sessions(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.end()

    def wait_reports(self, count: int = 1, timeout: float = 30.0) -> list[SessionReport]:
        """Block until ``count`` sessions have ended (at most ``timeout`` s); their reports.

        Raises:
            TimeoutError: fewer sessions ended in time.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.reports) >= count, timeout):
                raise TimeoutError(f"{len(self.reports)} of {count} sessions ended in {timeout} s")
            return list(self.reports[:count])

    def wait_refused(self, count: int = 1, timeout: float = 30.0) -> list[str]:
        """Block until ``count`` connections were refused; their messages.

        Raises:
            TimeoutError: fewer refusals in time.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.refused) >= count, timeout):
                raise TimeoutError(f"{len(self.refused)} of {count} refusals in {timeout} s")
            return list(self.refused[:count])

    @property
    def spare_handler(self) -> FaultHandler | None:
        """The FaultHandler made for the next session (already started, serving only its own
        fd), or None while there is none: before ``start()``, or while the next is made after
        a session took one."""
        spare = self._handlers.peek()
        return spare.handler if spare is not None else None

    @property
    def active(self) -> int:
        """Sessions being served now."""
        with self._lock:
            return len(self._sessions)

    # -- one connection --------------------------------------------------------------

    def _refuse(self, who: str, err: BaseException) -> None:
        message = f"refused {who}: {err}"
        log.error("%s", message)
        with self._cond:
            self.refused.append(message)
            self._cond.notify_all()

    def _handshake(self, conn: socket.socket) -> None:
        """Read one connection's handshake and start its session, or refuse it.

        Never raises: whatever a peer sends, a refusal is recorded (and the
        fds it sent closed); the daemon and other sessions go on. The peer is
        named (psutil) only once its session runs or it is refused: looking
        its name up costs its first fault time.
        """
        cred: PeerCred | None = None
        pidfd = -1
        try:
            with conn:
                try:
                    cred = peer_credentials(conn)
                    fd, mappings, cred = recv_handshake(conn, timeout=self.handshake_timeout)
                except (HandshakeError, OSError) as err:
                    self._refuse(_describe(cred), err)
                    return
                # The process as of its connect(): immune to the pid being reused.
                pidfd = peer_pidfd(conn)
            self._serve(fd, mappings, cred, pidfd)
        except Exception as err:  # a bug must not take a handshake thread with it
            if pidfd >= 0:
                os.close(pidfd)
            self._refuse(_describe(cred), RuntimeError(f"{type(err).__name__}: {err}"))

    def _serve(
        self,
        fd: int,
        mappings: list[GuestRegionUffdMapping],
        cred: PeerCred,
        pidfd: int,
    ) -> None:
        """Start the session of an accepted handshake (owns ``fd`` and ``pidfd``), or refuse it."""
        refusal: Exception | None = None
        if cred.uid not in self.allow_uids:
            allowed = ", ".join(str(u) for u in sorted(self.allow_uids))
            refusal = HandshakeError(
                "peer",
                f"uid {cred.uid} is not allowed (allowed uids: {allowed}; see --allow-uid)",
            )
        elif self._stopping:
            refusal = RuntimeError("the daemon is shutting down")
        if refusal is not None:
            os.close(fd)
            if pidfd >= 0:
                os.close(pidfd)
            self._refuse(_describe(cred), refusal)
            return
        try:
            session = Session(
                fd,
                mappings,
                cred,
                self.source,
                self.options,
                self._session_ended,
                pidfd=pidfd,
                after_first=self._refill,
                spare=self._spare_handler,
            )
        except Exception as err:
            self._refuse(_describe(cred), err)
            return
        with self._lock:
            self._sessions.append(session)
        try:
            session.start()
        except Exception as err:
            with self._lock:
                self._sessions.remove(session)
            self._refill()  # it may have taken the spare handler
            self._refuse(_describe(cred), err)
            return
        if log.isEnabledFor(logging.INFO):
            log.info(
                "serving %s: %s, %s, page size %s",
                _describe(cred),
                plural(len(mappings), "region"),
                human_size(session.layout.length),
                human_size(session.layout.page_size),
            )

    def _spare_handler(self) -> FaultHandler | None:
        """The started spare FaultHandler for a session, or None (it makes its own)."""
        spare = self._handlers.take()
        return spare.handler if spare is not None else None

    def _refill(self) -> None:
        """Prepare the next session's spares: run once a session's first fault is in (or it
        failed), since preparing them costs CPU and the GIL that fault needs."""
        if isinstance(self.source, RemoteSource):
            self.source.warm()
        self._handlers.refill()

    def _session_ended(self, session: Session) -> None:
        """Called by a session once it has stopped: record, write the working set, report."""
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)
        # Its own lock: sessions ending at once must not save while another updates.
        with self._recorded_lock:
            self._recorded.update(session.faulted_source_offsets())
            if self.working_set_file is not None and len(self._recorded):
                try:
                    self._recorded.save(self.working_set_file)
                except OSError as err:
                    session.progress.error(
                        f"writing the working set {self.working_set_file}: {err}"
                    )
        report = session.report
        if self.json_reports:
            line = json.dumps({"session": report.to_json()})
        else:
            line = f"uffd handler: {report.summary()}"
        # One write under a lock: print() writes the text and the newline
        # apart, so two sessions ending at once could interleave their lines.
        with self._print_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        with self._cond:
            self.reports.append(report)
            self._cond.notify_all()


def _describe(cred: PeerCred | None) -> str:
    """``pid 123 (firecracker, uid 0)``: the peer as the logs name it (psutil for the name)."""
    if cred is None:
        return "a connection"
    try:
        name = psutil.Process(cred.pid).name()
    except (psutil.Error, OSError):
        name = "exited"
    return f"pid {cred.pid} ({name}, uid {cred.uid})"


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _listening(path: str) -> bool:
    """True if something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
