"""pyuffd: Linux userfaultfd for Python (userfaultfd(2), ioctl_userfaultfd(2)).

The low level is ``Userfaultfd`` (one fd and its ioctls), the events it
reads, the error hierarchy, ``uffd.mem`` regions and ``probe()``. On top of
it, ``FaultHandler`` serves faults with per-mapping ``UffdOps``.
"""

# _build comes first: importing it checks that the C extension is built.
from uffd import _build, dirty, mem
from uffd._constants import Feature, Ioctl, Mode
from uffd._errors import (
    DeadlineExceededError,
    HandlerRefusedError,
    MappingChangedError,
    NoMappingError,
    PageAccessError,
    PageExistsError,
    ProcessGoneError,
    UffdError,
    UnsupportedError,
)
from uffd._events import Event, Fork, PageFault, Remap, Remove, Unmap
from uffd._handler import FaultHandler
from uffd._mapping import Fault, Mapping
from uffd._memtype import FileMemory, Folio, MemoryType
from uffd._ops import AnonOps, HugetlbOps, ShmemOps, UffdOps, get_uffd_ops
from uffd._resolution import Resolution
from uffd._userfaultfd import Userfaultfd
from uffd.probe import Capabilities, probe

__version__ = _build.version()

__all__ = [
    "AnonOps",
    "Capabilities",
    "DeadlineExceededError",
    "Event",
    "Fault",
    "FaultHandler",
    "Feature",
    "FileMemory",
    "Folio",
    "Fork",
    "HandlerRefusedError",
    "HugetlbOps",
    "Ioctl",
    "Mapping",
    "MappingChangedError",
    "MemoryType",
    "Mode",
    "NoMappingError",
    "PageAccessError",
    "PageExistsError",
    "PageFault",
    "ProcessGoneError",
    "Remap",
    "Remove",
    "Resolution",
    "ShmemOps",
    "UffdError",
    "UffdOps",
    "Unmap",
    "UnsupportedError",
    "Userfaultfd",
    "dirty",
    "get_uffd_ops",
    "mem",
    "probe",
]
