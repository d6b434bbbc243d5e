"""Child script: the basic userfaultfd paths as an unprivileged user (uid 65534).

Usage: ``python rel_unpriv.py`` (started as root). Everything is imported
first, because the interpreter and the venv live under /root (mode 0700) and
cannot be read once the process is uid 65534; then the process drops to
nobody for good (setgroups, setgid, setuid) and records, as one JSON line on
stdout, what each path does:

- ``open_*``: the errno, exception type and message of Userfaultfd() through
  auto, syscall and device without user_mode_only, and with EVENT_FORK;
- ``umo``: user_mode_only: register, a MISSING fault from a thread served
  with copy, a zeropage, a WP fault served with writeprotect, wake,
  unregister, and a kernel-mode access (write(2) from registered memory),
  which such an fd does not report (EFAULT);
- ``handler``: FaultHandler() (PermissionError) and
  FaultHandler(uffd=Userfaultfd(user_mode_only=True)) serving faults;
- ``probe``: uffd.probe() as that user.

SIGALRM after 30 s bounds everything.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
import threading
import time
from typing import Any

from rel_common import arm_alarm, drop_privileges, page_pattern

import uffd
import uffd.probe
from uffd import Feature, Mode, PageFault, Resolution, mem

PS = mem.PAGE_SIZE
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
LIBC.write.restype = ctypes.c_ssize_t


def attempt(fn: Any) -> dict[str, Any]:
    try:
        fn().close()
        return {"ok": True}
    except Exception as err:
        return {
            "ok": False,
            "type": type(err).__name__,
            "errno": getattr(err, "errno", None),
            "message": str(err),
        }


def serve_one(ufd: uffd.Userfaultfd, answer: Any) -> PageFault:
    (event,) = ufd.read_events(max_events=1, timeout=10)
    assert isinstance(event, PageFault), event
    answer(event)
    return event


def user_mode_only() -> dict[str, Any]:
    out: dict[str, Any] = {}
    with (
        uffd.Userfaultfd(Feature.PAGEFAULT_FLAG_WP, user_mode_only=True) as ufd,
        mem.anon(4 * PS) as region,
    ):
        out["ioctls"] = int(ufd.register(region.addr, region.length, Mode.MISSING | Mode.WP))
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(region.read(0, PS)))
        reader.start()
        serve_one(ufd, lambda ev: ufd.copy(ev.address, page_pattern(0, PS), PS))
        reader.join(10)
        out["missing_served"] = got == [page_pattern(0, PS)]
        out["zeropage"] = ufd.zeropage(region.addr + PS, PS)
        out["zero_read"] = region.read(PS, PS) == bytes(PS)
        # A write to a write-protected page: a WP fault, served by un-protecting.
        ufd.writeprotect(region.addr, PS, True)
        writer = threading.Thread(target=region.write, args=(8, b"hello"))
        writer.start()
        event = serve_one(ufd, lambda ev: ufd.writeprotect(ev.address, PS, False))
        writer.join(10)
        out["wp_served"] = event.wp and region.read(8, 5) == b"hello"
        ufd.wake(region.addr, region.length)
        # A kernel-mode access (write(2) reading a missing page) is not reported: EFAULT.
        r, w = os.pipe()
        rc = LIBC.write(w, region.addr + 2 * PS, 16)
        out["kernel_access"] = errno.errorcode.get(ctypes.get_errno(), "?") if rc < 0 else rc
        os.close(r)
        os.close(w)
        ufd.unregister(region.addr, region.length)
        out["after_unregister"] = region.read(3 * PS, 4) == bytes(4)
    return out


def handler() -> dict[str, Any]:
    out: dict[str, Any] = {"default": attempt(lambda: _Stopper(uffd.FaultHandler()))}

    class Pattern(uffd.UffdOps):
        def handle_missing(self, fault: uffd.Fault) -> Resolution:
            return Resolution.copy(page_pattern(fault.offset // PS, PS))

    h = uffd.FaultHandler(uffd=uffd.Userfaultfd(user_mode_only=True))
    with h, mem.anon(8 * PS) as region:
        h.register(region, Mode.MISSING, Pattern())
        got: list[bytes] = []
        threads = [
            threading.Thread(target=lambda k=k: got.append(region.read(k * 2 * PS, 2 * PS)))
            for k in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        out["served"] = sorted(got) == sorted(
            page_pattern(2 * k, PS) + page_pattern(2 * k + 1, PS) for k in range(4)
        )
    # After stop(): a fault is counted just after its thread is woken.
    out["faults"] = sum(h.stats.total.faults.values())
    return out


class _Stopper:
    """Lets attempt() close a FaultHandler the way it closes a Userfaultfd."""

    def __init__(self, h: uffd.FaultHandler) -> None:
        self.h = h

    def close(self) -> None:
        self.h.stop()


def main() -> int:
    arm_alarm(30)
    drop_privileges()
    t0 = time.monotonic()
    result: dict[str, Any] = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid()}
    result["open_auto"] = attempt(lambda: uffd.Userfaultfd())
    result["open_syscall"] = attempt(lambda: uffd.Userfaultfd(via="syscall"))
    result["open_device"] = attempt(lambda: uffd.Userfaultfd(via="device"))
    result["open_fork"] = attempt(lambda: uffd.Userfaultfd(Feature.EVENT_FORK, user_mode_only=True))
    result["umo"] = user_mode_only()
    result["handler"] = handler()
    caps = uffd.probe()
    result["probe"] = caps.as_dict()
    result["probe_text"] = str(caps)
    result["elapsed_s"] = time.monotonic() - t0
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
