"""Ops "modules": memory sources that opt in to userfaultfd without touching the core.

Each is a ``UffdOps`` subclass, the way a kernel module would provide
``vm_uffd_ops``: ``FileOps`` and ``BufferOps`` serve MISSING faults (the C
pump serves them natively, without the GIL), ``MinorFillOps`` fills the page
cache through a second view of a memfd and CONTINUEs MINOR faults,
``GuestMemfdOps`` fills a memfd with pwrite and CONTINUEs without ever
mapping it, and ``WriteLogOps`` logs write-protect faults and un-protects. An
ops class of your own opts in to the native path by returning a
``NativeSource`` from ``native_source()``.
"""

from uffd._pump import NativeSource
from uffd.modules.guest_memfd import GuestMemfdOps
from uffd.modules.minor import MinorFillOps
from uffd.modules.sources import BufferOps, FileOps
from uffd.modules.wplog import WriteLogOps

__all__ = ["BufferOps", "FileOps", "GuestMemfdOps", "MinorFillOps", "NativeSource", "WriteLogOps"]
