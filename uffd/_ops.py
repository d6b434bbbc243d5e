"""``UffdOps``: per-mapping userfaultfd operations, a user-space ``vm_uffd_ops``.

Ops are the policy: which page a fault gets. What they support is derived
from which handlers exist, never declared separately (the review of the
kernel's vm_uffd_ops series; docs/dispatch.md). Under them sits the memory
type (``uffd._memtype``, the shipped kernel's five callbacks), which decides
what a mapping may be registered for. ``get_uffd_ops`` picks the ops for a
mapping: explicit ops first, else the built-in for its memory kind.
``kernel_grant`` is what the 6.18 kernel answers per kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from uffd._constants import Ioctl, Mode
from uffd._errors import UnsupportedError
from uffd._memtype import MEMORY_TYPES, MemoryType
from uffd._resolution import Resolution

if TYPE_CHECKING:
    from uffd._mapping import Fault, Mapping
    from uffd._pump import NativeSource

__all__ = [
    "AnonOps",
    "HugetlbOps",
    "ShmemOps",
    "UffdOps",
    "get_uffd_ops",
    "kernel_grant",
]

# What UFFDIO_REGISTER grants per memory kind on 6.18 before the mode masks
# (UFFD_API_RANGE_IOCTLS; hugetlb gets the _BASIC set: no ZEROPAGE, no MOVE).
_RANGE_IOCTLS = (
    Ioctl.WAKE
    | Ioctl.COPY
    | Ioctl.ZEROPAGE
    | Ioctl.MOVE
    | Ioctl.WRITEPROTECT
    | Ioctl.CONTINUE
    | Ioctl.POISON
)
_RANGE_IOCTLS_BASIC = Ioctl.WAKE | Ioctl.COPY | Ioctl.WRITEPROTECT | Ioctl.CONTINUE | Ioctl.POISON
KIND_IOCTLS: dict[str, Ioctl] = {
    "anon": _RANGE_IOCTLS,
    "shmem": _RANGE_IOCTLS,
    "hugetlb": _RANGE_IOCTLS_BASIC,
}


def kernel_grant(kind: str, mode: Mode) -> Ioctl | None:
    """What the 6.18 kernel's UFFDIO_REGISTER answers for ``kind`` and ``mode``; None if it refuses.

    Whether it refuses is the kind's memory type's decision (``MEMORY_TYPES``:
    mode 0 and unknown bits, MINOR without ``get_folio_noalloc``, i.e. on
    anonymous memory, and kinds no type covers); the ioctls are 6.18's:
    CONTINUE only with MINOR, WRITEPROTECT only with WP.
    """
    memory = MEMORY_TYPES.get(kind)
    if memory is None or memory.refusal(None, Mode(mode)) is not None:
        return None
    grant = KIND_IOCTLS[kind]
    if not mode & Mode.MINOR:
        grant &= ~Ioctl.CONTINUE
    if not mode & Mode.WP:
        grant &= ~Ioctl.WRITEPROTECT
    return grant


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name, None) is not getattr(UffdOps, name, None)


class UffdOps:
    """Base class of per-mapping ops; subclass it and define the handlers you support.

    Handlers (each optional; absence means "not supported"):

    - ``handle_missing(fault) -> Resolution``: a MISSING fault (copy, zero,
      poison or refuse);
    - ``handle_continue(fault) -> Resolution``: a MINOR fault (the page is
      in the page cache: continue, after updating it through another view);
    - ``handle_wp(fault) -> Resolution``: a write-protect fault (unprotect,
      copy with ``keep_wp``, or refuse).

    Calling context: handlers run on the FaultHandler's dispatch thread, one
    at a time. A handler must not touch memory of any mapping registered on
    the same handler (it would fault and wait for itself); it may block on
    I/O, but a handler that fetches over a network should return
    ``Resolution.defer()`` and call ``handler.resolve(fault, r)`` when the
    answer arrives, so faults from several threads are fetched concurrently.
    If a handler raises, returns None, or misses the deadline, the fault is
    resolved by the handler's fallback policy and the error is re-raised
    from ``FaultHandler.stop()``.

    Derived class attributes: ``features`` (the Mode bits the handlers
    serve: MISSING iff handle_missing, MINOR iff handle_continue, WP iff
    handle_wp) and ``ioctls`` (what those handlers need, plus what the memory
    ``kind`` always allows). A subclass that declares either must match the
    derivation, or defining it raises TypeError.
    """

    features: ClassVar[Mode] = Mode(0)
    ioctls: ClassVar[Ioctl] = Ioctl(0)
    #: The memory kind this ops serves ("anon", "shmem", "hugetlb"), or None for any.
    kind: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        features = Mode(0)
        if _overrides(cls, "handle_missing"):
            features |= Mode.MISSING
        if _overrides(cls, "handle_wp"):
            features |= Mode.WP
        if _overrides(cls, "handle_continue"):
            features |= Mode.MINOR
        if cls.kind is not None:
            ioctls = KIND_IOCTLS[cls.kind]
        else:
            ioctls = Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.POISON
        if not features & Mode.MINOR:
            ioctls &= ~Ioctl.CONTINUE
        else:
            ioctls |= Ioctl.CONTINUE
        if not features & Mode.WP:
            ioctls &= ~Ioctl.WRITEPROTECT
        else:
            ioctls |= Ioctl.WRITEPROTECT
        for name, derived in (("features", features), ("ioctls", ioctls)):
            declared = cls.__dict__.get(name)
            if declared is not None and int(declared) != int(derived):
                raise TypeError(
                    f"{cls.__qualname__}.{name} = {declared!r} disagrees with its handlers, "
                    f"which imply {derived!r}; drop the declaration (it is derived)"
                )
        cls.features = features
        cls.ioctls = ioctls

    # Handlers are looked up with getattr; the base class defines none of them.
    handle_missing: Any = None
    handle_continue: Any = None
    handle_wp: Any = None

    def can_userfault(self, mapping: Mapping | None, mode: Mode) -> bool:
        """May ``mapping`` be registered with ``mode``? Called by ``FaultHandler.register``.

        Default: ``mode`` is within ``features`` (False otherwise), and the
        memory type under the mapping accepts it.

        Raises:
            UnsupportedError: the memory type refuses ``mode``; the message
                names the callback it lacks (or its own ``can_userfault``).
        """
        # int(): ~ on an IntFlag complements within the named bits only, so an
        # unknown bit (Mode(8)) would pass; the kernel refuses it (EINVAL).
        if not mode or int(mode) & ~int(self.features):
            return False
        memory = self.memory_type(mapping)
        reason = memory.refusal(mapping, mode) if memory is not None else None
        if reason is not None:
            where = {} if mapping is None else {"addr": mapping.start, "length": mapping.length}
            raise UnsupportedError(f"register: {reason}", op="register", **where)
        return True

    def memory_type(self, mapping: Mapping | None) -> MemoryType | None:
        """The memory type under ``mapping``: the built-in for its kind (or this ops' kind).

        None when neither names a kind (the decision is then the kernel's
        alone). An ops whose pages live elsewhere (``GuestMemfdOps``)
        returns its own.

        Raises:
            UnsupportedError: a kind no memory type covers ("file").
        """
        kind = mapping.kind if mapping is not None else self.kind
        if kind is None:
            return None
        try:
            return MEMORY_TYPES[kind]
        except KeyError:
            raise UnsupportedError(
                f"no memory type for {kind!r} memory: userfaultfd serves anon, shmem and hugetlb",
                op="register",
            ) from None

    def native_source(self, mapping: Mapping) -> NativeSource | None:
        """A source the C pump serves MISSING faults from without entering Python, or None.

        Returns a ``uffd.modules.NativeSource``: memory at an address, a file
        at an offset, or zeros; while faults are sequential the pump installs
        up to its ``max_run`` bytes per fault (a run that doubles from one
        page). Memory must outlive the mapping; a file's fd is duplicated by
        the pump. Faults the pump cannot serve still reach the handlers, so
        ``handle_missing`` must give the same answer.
        """
        return None

    def honoured(self, kind: str, mode: Mode) -> Ioctl | None:
        """The ioctls honoured on ``kind`` memory registered with ``mode``; None if refused.

        This is the emulated UFFDIO_REGISTER answer: the kernel's grant for
        the kind, masked by what the ops supports.
        """
        grant = kernel_grant(kind, mode)
        return None if grant is None else grant & self.ioctls

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} features={self.features!r}>"


class AnonOps(UffdOps):
    """Private anonymous memory: MISSING and WP; MINOR refused (no page cache).

    Missing pages are zero-filled and WP faults un-protected, as the kernel
    does without a userfaultfd.
    """

    kind = "anon"

    def handle_missing(self, fault: Fault) -> Resolution:
        """Zero-fill the page."""
        return Resolution.zero()

    def handle_wp(self, fault: Fault) -> Resolution:
        """Let the write through."""
        return Resolution.unprotect()


class ShmemOps(AnonOps):
    """shmem (memfd, tmpfs, SysV): MISSING, WP and MINOR."""

    kind = "shmem"

    def handle_continue(self, fault: Fault) -> Resolution:
        """Map the page that is already in the page cache."""
        return Resolution.continue_()


class HugetlbOps(ShmemOps):
    """hugetlbfs: MISSING, WP and MINOR; no ZEROPAGE and no MOVE (zero-fill copies zeros)."""

    kind = "hugetlb"


_BUILTIN: dict[str, UffdOps] = {"anon": AnonOps(), "shmem": ShmemOps(), "hugetlb": HugetlbOps()}
for _cls in (UffdOps, AnonOps, ShmemOps, HugetlbOps):
    _cls.__module__ = "uffd"


def get_uffd_ops(mapping: Any, ops: UffdOps | None = None) -> UffdOps:
    """The ops that serve ``mapping``: the kernel's ``get_uffd_ops(vma)`` step.

    Explicit ``ops`` first; else a registered ``Mapping``'s own ops; else the
    built-in for the memory kind: ``mapping`` may be a kind ("anon", "shmem",
    "hugetlb"), a ``uffd.mem.Region`` (its kind is known), or an
    ``(addr, length)`` tuple (the kind is read from /proc/self/smaps).

    Raises:
        UnsupportedError: a memory kind no ops covers (file-backed memory other
            than shmem/hugetlb has no userfaultfd support in 6.18).
        ValueError: an ``(addr, length)`` where nothing is mapped.
        TypeError: ``ops`` is not a UffdOps, or ``mapping`` is none of the above.
    """
    if ops is not None:
        if not isinstance(ops, UffdOps):
            raise TypeError(f"ops must be a uffd.UffdOps instance, not {type(ops).__name__}")
        return ops
    if isinstance(mapping, tuple):
        from uffd import mem

        try:
            kind = mem.kind_of(int(mapping[0]))[0]
        except LookupError as err:
            raise ValueError(f"get_uffd_ops: {err}") from None
    elif isinstance(mapping, str):
        kind = mapping
    elif isinstance(getattr(mapping, "ops", None), UffdOps):
        return mapping.ops  # type: ignore[no-any-return]
    elif isinstance(getattr(mapping, "kind", None), str):
        kind = mapping.kind
    else:
        raise TypeError(
            "get_uffd_ops: mapping must be a Mapping, a uffd.mem.Region, an (addr, length) "
            f"tuple or a memory kind, not {type(mapping).__name__}"
        )
    try:
        return _BUILTIN[kind]
    except KeyError:
        raise UnsupportedError(
            f"no vm_uffd_ops for {kind!r} memory: the kernel supports anon, shmem and "
            "hugetlb; pass ops= for anything else"
        ) from None
