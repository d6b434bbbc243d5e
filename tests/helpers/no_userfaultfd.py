"""Run a command with userfaultfd blocked, as Docker's default seccomp profile does.

Usage: ``python no_userfaultfd.py COMMAND ARGS...``. Installs a seccomp filter
that fails the userfaultfd(2) syscall and the /dev/userfaultfd
``USERFAULTFD_IOC_NEW`` ioctl with EPERM (what a container without a custom
profile sees), then execs the command, which inherits the filter.
"""

from __future__ import annotations

import ctypes
import os
import sys

_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}[os.uname().machine]
_NR_IOCTL = {"x86_64": 16, "aarch64": 29}[os.uname().machine]
USERFAULTFD_IOC_NEW = 0xAA00  # _IO(0xAA, 0x00), linux/userfaultfd.h

_LD_ABS_W, _JEQ_K, _RET_K = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
_RET_ALLOW, _RET_EPERM = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, _ERRNO | EPERM
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


class _Insn(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class _Prog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Insn)))


# seccomp_data: nr at offset 0; args[1] (the ioctl request) at 24, low word first.
PROGRAM = [
    (_LD_ABS_W, 0, 0, 0),
    (_JEQ_K, 4, 0, _NR_USERFAULTFD),  # -> block
    (_JEQ_K, 0, 2, _NR_IOCTL),  # not ioctl -> allow
    (_LD_ABS_W, 0, 0, 24),
    (_JEQ_K, 1, 0, USERFAULTFD_IOC_NEW),  # -> block
    (_RET_K, 0, 0, _RET_ALLOW),
    (_RET_K, 0, 0, _RET_EPERM),
]


def block_userfaultfd() -> None:
    """Install the filter on this process (inherited across fork and exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    insns = (_Insn * len(PROGRAM))(*(_Insn(*i) for i in PROGRAM))
    prog = _Prog(len(PROGRAM), insns)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    block_userfaultfd()
    os.execvp(sys.argv[1], sys.argv[1:])
