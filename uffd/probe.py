"""``uffd.probe()``: what this host allows, and why (``python -m uffd probe``)."""

from __future__ import annotations

import errno
import json
import mmap
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uffd._constants import Feature, Ioctl
from uffd._native import ffi, lib
from uffd._userfaultfd import explain_open_error

__all__ = ["Capabilities", "OpenPath", "parse_features", "probe", "unmet"]


@dataclass(frozen=True)
class OpenPath:
    """Whether one way of opening a userfaultfd works for this process, and why not."""

    works: bool
    errno: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class Capabilities:
    """The answer of ``probe()``; ``str()`` is the human report, ``as_dict()`` the JSON one."""

    kernel: str
    page_size: int
    huge_page_sizes: list[int]
    free_huge_pages: dict[int, int]
    nr_hugepages: int | None
    available: Feature
    ioctls: Ioctl
    syscall: OpenPath
    device: OpenPath
    user_mode_only: OpenPath
    unprivileged_userfaultfd: int | None
    uid: int
    missing_features: list[str] = field(default_factory=list)

    def has(self, features: Feature) -> bool:
        """True if every bit of ``features`` is available."""
        return self.available & features == features

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (feature and ioctl sets as lists of names)."""
        data = asdict(self)
        data["available"] = [f.name for f in Feature if f in self.available]
        data["available_mask"] = int(self.available)
        data["ioctls"] = [i.name for i in Ioctl if i in self.ioctls]
        data["free_huge_pages"] = {str(k): v for k, v in self.free_huge_pages.items()}
        return data

    def __str__(self) -> str:
        def path_line(name: str, p: OpenPath) -> str:
            state = "works" if p.works else "fails"
            return f"  {name:<17} {state}{': ' + p.reason if p.reason else ''}"

        known = [f for f in Feature]
        present = sum(f in self.available for f in known)
        lines = [
            f"kernel            {self.kernel}",
            f"page size         {self.page_size}",
            "huge pages        "
            + (
                ", ".join(
                    f"{s // 1024} KiB: {self.free_huge_pages.get(s, 0)} free"
                    for s in self.huge_page_sizes
                )
                or "none"
            )
            + f" (vm.nr_hugepages={self.nr_hugepages})",
            f"uid               {self.uid}",
            f"vm.unprivileged_userfaultfd = {self.unprivileged_userfaultfd}",
            "open paths:",
            path_line("syscall", self.syscall),
            path_line("/dev/userfaultfd", self.device),
            path_line("user_mode_only", self.user_mode_only),
            f"features          {present} of {len(known)} available",
        ]
        lines += [f"  {'yes' if f in self.available else 'no ':<4} {f.name}" for f in known]
        lines.append(
            "ioctls            " + " ".join(i.name or "" for i in Ioctl if i in self.ioctls)
        )
        return "\n".join(lines)


def _why_it_works(via: str, flags: int) -> str:
    if via == "device":
        st = os.stat("/dev/userfaultfd")
        mode = st.st_mode & 0o777
        return f"/dev/userfaultfd (mode {mode:o}, uid {st.st_uid}, gid {st.st_gid}) is accessible"
    if flags & lib.UFFD_USER_MODE_ONLY:
        return "user-mode-only fds need no privilege"
    if os.geteuid() == 0:
        return "running as root (CAP_SYS_PTRACE)"
    if _read_int("/proc/sys/vm/unprivileged_userfaultfd") == 1:
        return "vm.unprivileged_userfaultfd = 1"
    return "this process has CAP_SYS_PTRACE"


def _try_open(opener: Any, flags: int, via: str) -> tuple[OpenPath, int, int]:
    fd = opener(flags)
    if fd < 0:
        reason = explain_open_error(via, -fd)
        if -fd in (errno.EPERM, errno.EACCES) and _seccomp_filtered():
            reason = (
                "a seccomp filter is active on this process and may block userfaultfd, as "
                "Docker's default profile does (allow the syscall in the profile, or pass "
                f"--device /dev/userfaultfd); otherwise: {reason}"
            )
        return OpenPath(False, -fd, reason), 0, 0
    try:
        features = ffi.new("uint64_t *")
        ioctls = ffi.new("uint64_t *")
        rc = lib.pyuffd_api(fd, 0, features, ioctls)
        if rc < 0:
            return OpenPath(False, -rc, f"UFFDIO_API failed: {os.strerror(-rc)}"), 0, 0
        return OpenPath(True, None, _why_it_works(via, flags)), features[0], ioctls[0]
    finally:
        os.close(fd)


def _seccomp_filtered() -> bool:
    """Whether a seccomp filter applies to this process (``Seccomp: 2`` in /proc/self/status)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    return any(line.split() == ["Seccomp:", "2"] for line in status.splitlines())


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _huge_pages() -> dict[int, int]:
    sizes: dict[int, int] = {}
    root = Path("/sys/kernel/mm/hugepages")
    if root.is_dir():
        for d in root.iterdir():
            size = int(d.name.removeprefix("hugepages-").removesuffix("kB")) * 1024
            sizes[size] = _read_int(str(d / "free_hugepages")) or 0
    return dict(sorted(sizes.items()))


def probe() -> Capabilities:
    """Report the kernel, page sizes, huge pages, features, and which open paths work.

    Never raises for a missing capability: each open path records its errno
    and the reason. Safe to call from any thread; opens and closes
    short-lived fds only.
    """
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    syscall, s_feat, s_ioctls = _try_open(lib.pyuffd_open_syscall, flags, "syscall")
    device, d_feat, d_ioctls = _try_open(lib.pyuffd_open_device, flags, "device")
    umo, u_feat, u_ioctls = _try_open(
        lib.pyuffd_open_syscall, flags | lib.UFFD_USER_MODE_ONLY, "syscall"
    )
    features = s_feat or d_feat or u_feat
    ioctls = s_ioctls or d_ioctls or u_ioctls
    huge = _huge_pages()
    available = Feature(features)
    return Capabilities(
        kernel=os.uname().release,
        page_size=mmap.PAGESIZE,
        huge_page_sizes=list(huge),
        free_huge_pages=huge,
        nr_hugepages=_read_int("/proc/sys/vm/nr_hugepages"),
        available=available,
        ioctls=Ioctl(ioctls),
        syscall=syscall,
        device=device,
        user_mode_only=umo,
        unprivileged_userfaultfd=_read_int("/proc/sys/vm/unprivileged_userfaultfd"),
        uid=os.getuid(),
        missing_features=[f.name or "" for f in Feature if f not in available],
    )


def parse_features(text: str) -> Feature:
    """``"MOVE,wp_async"`` -> ``Feature.MOVE | Feature.WP_ASYNC`` (case and the prefix optional).

    Names are the kernel's without ``UFFD_FEATURE_``; that prefix is accepted too.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    wanted = Feature(0)
    for raw in text.split(","):
        name = raw.strip().upper().removeprefix("UFFD_FEATURE_")
        if not name:
            continue
        try:
            wanted |= Feature[name]
        except KeyError:
            known = ", ".join(f.name or "" for f in Feature)
            raise ValueError(
                f"unknown userfaultfd feature {raw.strip()!r}; known: {known}"
            ) from None
    return wanted


def unmet(caps: Capabilities, features: Feature = Feature(0)) -> str | None:
    """Why this host cannot run code that needs ``features``; None when it can.

    The reason names what is missing: every way of opening a userfaultfd
    failing (with each path's cause), or the features the kernel lacks.
    """
    paths = (
        ("syscall", caps.syscall),
        ("/dev/userfaultfd", caps.device),
        ("user_mode_only", caps.user_mode_only),
    )
    if not any(p.works for _, p in paths):
        codes = ", ".join(
            f"{name} {errno.errorcode.get(p.errno or 0, p.errno)}" for name, p in paths
        )
        return (
            f"no way to open a userfaultfd works for uid {caps.uid} ({codes}): "
            f"{caps.syscall.reason}"
        )
    absent = [f.name or hex(f) for f in Feature if f & features and f not in caps.available]
    if absent:
        return (
            f"needs UFFD_FEATURE_{', UFFD_FEATURE_'.join(absent)}: "
            f"not available on Linux {caps.kernel}"
        )
    return None


def main(as_json: bool = False, require: Feature | None = None) -> int:
    """Print the probe (``--json``: as JSON); exit status 0 if the host can run userfaultfd.

    With ``require``, also 1 when any of those features is missing; the
    reason goes to stderr (and to the JSON's ``unmet``), for shell CI.
    """
    caps = probe()
    why = unmet(caps, require or Feature(0))
    if as_json:
        print(json.dumps({**caps.as_dict(), "unmet": why}, indent=2))
    else:
        print(caps)
    if why is not None:
        print(f"uffd probe: {why}", file=sys.stderr)
        return 1
    return 0
