"""Child process: fault on registered memory from a thread that holds the GIL.

Why a separate process: while the main thread holds the GIL inside the fault,
no Python code can run anywhere in the process, so only the handler's C
watchdog can release it; if the library failed to, this process would hang
and the test (which runs it under a timeout) reports that instead of hanging.

Usage: ``python dispatch_gil.py DEADLINE [FALLBACK]``. Prints one JSON line:
the bytes read, the elapsed seconds, the main thread's tid, what ``stop()``
raised, and the handler's stats.
"""

from __future__ import annotations

import ctypes
import json
import signal
import sys
import threading
import time

import uffd
from uffd import FaultHandler, Mode, Resolution, UffdOps, mem


class Pattern(UffdOps):
    """Answers with 0xAA pages: the reader sees zeros only if the fallback answered."""

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        return Resolution.copy(b"\xaa" * fault.mapping.page_size)


def main() -> None:
    signal.alarm(30)  # a library that fails to release the fault dies here
    deadline = float(sys.argv[1])
    kwargs = {"fallback": sys.argv[2]} if len(sys.argv) > 2 else {}
    region = mem.anon(mem.PAGE_SIZE)
    handler = FaultHandler(deadline=deadline, **kwargs).start()
    handler.register(region, Mode.MISSING, Pattern())
    t0 = time.monotonic()
    data = ctypes.string_at(region.addr, 8)  # holds the GIL while it faults
    elapsed = time.monotonic() - t0
    error = None
    try:
        handler.stop()
    except Exception as err:  # reported to the test
        error = {
            "type": type(err).__name__,
            "message": str(err),
            "thread_id": getattr(err, "thread_id", None),
        }
    stats = handler.stats
    print(
        json.dumps(
            {
                "data": data.hex(),
                "elapsed": elapsed,
                "tid": threading.get_native_id(),
                "error": error,
                "expired": stats.expired,
                "resolutions": dict(stats.total.resolutions),
                "errors": stats.total.errors,
            }
        )
    )
    region.close()


if __name__ == "__main__":
    main()
