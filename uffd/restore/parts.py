"""What a session's fault path and prefetch thread share: :class:`SessionParts`."""

from __future__ import annotations

import dataclasses
import threading

from uffd._handler import FaultHandler
from uffd.restore.layout import GuestLayout
from uffd.restore.progress import Progress
from uffd.restore.sources import FlatSource

__all__ = ["SessionParts"]


@dataclasses.dataclass(frozen=True)
class SessionParts:
    """One session's handler, layout, source (its own connections) and tally.

    ``ending`` is set when the session starts to end: its threads and late
    page-server replies then stop touching the handler.
    """

    handler: FaultHandler
    layout: GuestLayout
    source: FlatSource
    progress: Progress
    ending: threading.Event
