"""Fault-path and bulk threads get the niceness and time slice uffd.restore.priority gives them.

Read back from the kernel (/proc/self/task/TID/stat and .../sched) for real
threads: the fault path's short slice is inherited by the threads it starts,
and a page client that streams a restore (``bulk=True``) takes the default
slice back on its reader thread while keeping the niceness.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from uffd.pagestore.client import ThreadedPageClient
from uffd.pagestore.server import ServerThread
from uffd.pagestore.snapshot import RawMemoryFile
from uffd.restore.priority import (
    URGENT_NICE,
    URGENT_SLICE_NS,
    bulk_thread_priority,
    raise_thread_priority,
)

PS = os.sysconf("SC_PAGE_SIZE")
WAIT = 10.0


def _slice(tid: int) -> int | None:
    """The thread's EEVDF slice in ns (``se.slice``), or None where the kernel does not show it."""
    try:
        text = Path(f"/proc/self/task/{tid}/sched").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    return None


def _nice(tid: int) -> int:
    """The thread's niceness, field 19 of /proc/self/task/TID/stat."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def _default_slice() -> int:
    """This (never raised) thread's slice, skipping where slices are not shown or not set."""
    default = _slice(threading.get_native_id())
    if default is None:
        pytest.skip("the kernel does not show se.slice in /proc (no CONFIG_SCHED_DEBUG)")
    return default


def _own_slice_and_nice() -> tuple[int | None, int]:
    """The calling thread's slice and niceness."""
    tid = threading.get_native_id()
    return _slice(tid), _nice(tid)


def _on_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a fresh thread (priorities stick to the thread), its result; bounded."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "the thread did not finish"
    if errors:
        raise errors[0]
    return out[0]


def _can_raise() -> bool:
    """True where this process may lower niceness (root or CAP_SYS_NICE)."""
    return bool(
        _on_thread(
            lambda: (raise_thread_priority(), _nice(threading.get_native_id()))[1] == URGENT_NICE
        )
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A page server of a 16-page raw memory file."""
    path = tmp_path_factory.mktemp("prio") / "m.raw"
    path.write_bytes(os.urandom(16 * PS))
    with RawMemoryFile(path, regions=[("mem", 0, 16 * PS)]) as source, ServerThread(source) as srv:
        yield srv


def test_the_fault_path_slice_and_niceness_are_inherited_by_the_threads_it_starts() -> None:
    """A raised thread runs with the short slice, and so do threads it starts afterwards."""
    default = _default_slice()
    if default == URGENT_SLICE_NS:
        pytest.skip("the default slice is the urgent one already")

    def raised_then_child() -> tuple[int | None, int, int | None, int]:
        raise_thread_priority()
        me = threading.get_native_id()
        child = _on_thread(
            lambda: (_slice(threading.get_native_id()), _nice(threading.get_native_id()))
        )
        return _slice(me), _nice(me), child[0], child[1]

    mine, my_nice, childs, child_nice = _on_thread(raised_then_child)
    assert mine == URGENT_SLICE_NS and childs == URGENT_SLICE_NS
    assert child_nice == my_nice
    if _can_raise():
        assert my_nice == URGENT_NICE


def test_a_bulk_thread_takes_the_default_slice_back_and_keeps_the_niceness() -> None:
    """bulk_thread_priority() on a thread started by a raised one: default slice, same niceness."""
    default = _default_slice()

    def raised_then_bulk_child() -> tuple[int | None, int, int]:
        raise_thread_priority()

        def bulk() -> tuple[int | None, int]:
            bulk_thread_priority()
            return _own_slice_and_nice()

        got_slice, got_nice = _on_thread(bulk)
        return got_slice, got_nice, _nice(threading.get_native_id())

    got_slice, got_nice, parent_nice = _on_thread(raised_then_bulk_child)
    assert got_slice == default
    assert got_nice == parent_nice  # never nicer than the fault path: it shares its locks


def test_only_a_bulk_page_client_reader_leaves_the_fault_path_slice(server: ServerThread) -> None:
    """Page clients opened by a raised thread: the bulk one's reader gets the default slice."""
    default = _default_slice()
    if default == URGENT_SLICE_NS:
        pytest.skip("the default slice is the urgent one already")

    def clients() -> tuple[ThreadedPageClient, ThreadedPageClient]:
        raise_thread_priority()
        return ThreadedPageClient(server.url), ThreadedPageClient(server.url, bulk=True)

    urgent, bulk = _on_thread(clients)
    with urgent, bulk:
        # The reader sets its slice as it starts: one round trip proves it has.
        assert bulk.fetch("mem", 0, PS).result(WAIT) == urgent.fetch("mem", 0, PS).result(WAIT)
        assert _slice(urgent._thread.native_id or 0) == URGENT_SLICE_NS
        assert _slice(bulk._thread.native_id or 0) == default
