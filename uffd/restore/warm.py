"""What a daemon's next session needs, made ahead and kept fresh: :class:`WarmSpare`.

Each session of a page server reads through connections of its own (a bulk
client and the faults' link: :class:`uffd.restore.sources.RemoteSource`),
and opening them (TCP, then HELLO, AUTH, LIST and REGIONS on each) would
cost a new session's first fault a few milliseconds. The daemon keeps one
set open ahead instead: a keeper thread opens it, keeps it alive while it
waits (a read on each connection, well before the server drops an idle
client), and replaces it when the server closed it (it restarted) or after
a session took it. A server that cannot be reached leaves no spare: the
keeper retries with a back-off, and a session meanwhile opens its own
connections, which reports the failure, as it would without a spare.

The daemon keeps a :class:`SpareHandler` the same way: a constructed
:class:`uffd.FaultHandler` (its own userfaultfd, the pump), which the next
session hands its process's userfaultfd to (``adopt``) instead of
constructing one between the handshake and the first fault.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from uffd._handler import FaultHandler

__all__ = ["SpareHandler", "WarmSpare"]

log = logging.getLogger("uffd.restore.daemon")

_RETRY = (0.1, 5.0)  # seconds: first and longest wait before opening again after a failure
_JOIN = 2.0  # seconds close() waits for the keeper (an open in progress finishes on its own)


class Spare(Protocol):
    """What the keeper needs of a spare: whether it is broken, a keepalive, a close."""

    @property
    def stale(self) -> bool:
        """True once a connection is known to be closed or broken."""
        ...

    def keepalive(self) -> None:
        """Use every connection, so the server does not drop an idle client."""
        ...

    def close(self) -> None:
        """Close every connection (idempotent)."""
        ...


S = TypeVar("S", bound=Spare)


class WarmSpare(Generic[S]):
    """One spare ``S`` opened by ``open_spare`` on a keeper thread, ready for ``take()``.

    ``interval``: seconds between keepalives of a waiting spare (below the
    server's idle timeout). ``label`` names the spare in log lines
    ("connections to tcp://...", "fault handler"). After ``take()`` the keeper opens the next spare
    only once asked (``refill()``): the session that took one calls it after
    its first fault, which an open in progress would slow down.

    Calling context: any thread. ``close()`` (idempotent) stops the keeper,
    waiting for it at most 2 s (a connect in progress is closed by the
    keeper when it returns), and closes the spare.
    """

    def __init__(self, open_spare: Callable[[], S], *, label: str, interval: float) -> None:
        self._open = open_spare
        self._label = label
        self._interval = interval
        self._cond = threading.Condition()
        self._spare: S | None = None
        self._want = True
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the keeper thread (once; not after ``close()``)."""
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name="uffd-warm-spare", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        """True while a spare waits for ``take()``."""
        return self._spare is not None

    def peek(self) -> S | None:
        """The spare waiting for ``take()``, left in place (None while there is none)."""
        return self._spare

    def take(self) -> S | None:
        """The spare if one is ready and not known broken, else None (open one yourself).

        A broken spare found here is closed, and the keeper opens the next.
        """
        with self._cond:
            spare, self._spare = self._spare, None
            if spare is not None and spare.stale:
                self._want = True
                self._cond.notify_all()
        if spare is not None and spare.stale:
            spare.close()
            return None
        return spare

    def refill(self) -> None:
        """Have the keeper open the next spare now, unless one is ready."""
        with self._cond:
            self._want = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the keeper and close the spare (idempotent)."""
        with self._cond:
            self._closed = True
            spare, self._spare = self._spare, None
            thread = self._thread
            self._cond.notify_all()
        if spare is not None:
            spare.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN)

    # -- the keeper thread -------------------------------------------------------

    def _run(self) -> None:
        retry = _RETRY[0]
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._want or self._spare is not None)
                if self._closed:
                    return
                spare = self._spare
            if spare is None:
                retry = self._fill(retry)
            else:
                self._keep(spare)

    def _fill(self, retry: float) -> float:
        """Open a spare and offer it; after a failure, wait ``retry`` s. The next wait."""
        try:
            fresh: S | None = self._open()
        except Exception as err:
            level = logging.INFO if retry == _RETRY[0] else logging.DEBUG
            log.log(level, "no spare %s yet (%s); retrying", self._label, err)
            with self._cond:
                self._cond.wait_for(lambda: self._closed, retry)
            return min(_RETRY[1], retry * 2)
        with self._cond:
            if not self._closed and self._spare is None:
                self._spare, self._want, fresh = fresh, False, None
        if fresh is not None:
            fresh.close()
        return _RETRY[0]

    def _keep(self, spare: S) -> None:
        """Wait ``interval`` s for a take or a close; then keep ``spare`` alive, or replace
        it when its server closed it. Held out of ``take()``'s reach meanwhile."""
        with self._cond:
            taken = self._cond.wait_for(
                lambda: self._closed or self._spare is not spare, self._interval
            )
            if taken:
                return
            self._spare = None
        alive = False
        try:
            if not spare.stale:
                spare.keepalive()
                alive = not spare.stale
        except Exception as err:
            log.debug("the spare %s failed a keepalive: %s", self._label, err)
        with self._cond:
            if not alive:
                self._want = True
            elif not self._closed and self._spare is None:
                self._spare = spare
                return
        spare.close()


class SpareHandler:
    """A FaultHandler made ahead for the next session: a :class:`WarmSpare` of handlers.

    ``fallback`` and ``deadline`` are the daemon's (FaultHandler's). A session
    takes ``handler`` and owns it from then on (``_adopt_paused`` its
    process's fd, ``register`` there, ``_resume``, ``stop`` at its end);
    ``close()`` stops one never taken. Started here, so its dispatch thread's
    start (100-200 us) is off the session's path: the fd is adopted paused,
    since a running dispatch thread would otherwise read the process's first
    fault before its regions are registered, wake it as a fault on no
    mapping and take the GIL from the thread registering them.

    Raises (constructor): as FaultHandler's (PermissionError: this process may
    not open a userfaultfd; the keeper retries, and sessions make their own).
    """

    def __init__(self, fallback: str, deadline: float) -> None:
        self.handler = FaultHandler(fallback=fallback, deadline=deadline).start()

    @property
    def stale(self) -> bool:
        """False: an idle handler serves nothing that could break."""
        return False

    def keepalive(self) -> None:
        """Nothing to keep alive: an idle handler reads only its own, unregistered fd."""

    def close(self) -> None:
        """Stop the handler: its pump and its own userfaultfd (idempotent)."""
        self.handler.stop()
