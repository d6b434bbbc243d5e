"""What a session's fault path and prefetch thread share: :class:`SessionParts`."""

from __future__ import annotations

import dataclasses
import threading

from uffd._handler import FaultHandler
from uffd._userfaultfd import Userfaultfd
from uffd.restore.layout import GuestLayout
from uffd.restore.progress import Progress
from uffd.restore.sources import FlatSource

__all__ = ["SessionParts"]


@dataclasses.dataclass(frozen=True)
class SessionParts:
    """One session's handler, the process's userfaultfd, layout, source (its own
    connections) and tally.

    ``uffd`` is the fd the session's ranges are registered on: the handler may
    be a daemon's spare serving a userfaultfd of its own too (``handler.uffd``).

    ``ending`` is set when the session starts to end: its threads and late
    page-server replies then stop touching the handler.
    """

    handler: FaultHandler
    uffd: Userfaultfd
    layout: GuestLayout
    source: FlatSource
    progress: Progress
    ending: threading.Event
