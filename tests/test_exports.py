"""The public surface matches api.md sections 1-6: names, signatures, fields, bases."""

from __future__ import annotations

import dataclasses
import enum
import inspect

import pytest
from conftest import FEATURE_BITS, IOCTL_BITS

import uffd
from uffd import Feature, mem

API_NAMES = {
    "Feature",
    "Mode",
    "Ioctl",
    "Userfaultfd",
    "PageFault",
    "Fork",
    "Remap",
    "Remove",
    "Unmap",
    "UffdError",
    "PageExistsError",
    "MappingChangedError",
    "NoMappingError",
    "ProcessGoneError",
    "UnsupportedError",
    "PageAccessError",
    "mem",
    "probe",
}


def params(func: object) -> list[tuple[str, inspect._ParameterKind, object]]:
    """(name, kind, default) of each parameter except self."""
    sig = inspect.signature(func)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name != "self"]


POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
KW = inspect.Parameter.KEYWORD_ONLY
EMPTY = inspect.Parameter.empty


# -- the module --------------------------------------------------------------


def test_all_lists_every_api_name():
    """``uffd.__all__`` contains every name of api.md sections 1-6, each one importable."""
    assert set(uffd.__all__) >= API_NAMES
    for name in uffd.__all__:
        assert hasattr(uffd, name), name


def test_all_has_no_duplicates_or_private_names():
    """``__all__`` is a curated list: no duplicates, nothing private."""
    assert len(uffd.__all__) == len(set(uffd.__all__))
    assert not [n for n in uffd.__all__ if n.startswith("_")]


def test_public_classes_show_the_uffd_module():
    """Errors, events and constants report ``__module__ == "uffd"`` (tracebacks show it)."""
    for name in API_NAMES - {"mem", "probe", "Userfaultfd"}:
        assert getattr(uffd, name).__module__ == "uffd", name


# -- section 1: constants ------------------------------------------------------


@pytest.mark.parametrize("name", ["Feature", "Mode", "Ioctl"])
def test_constants_are_intflags(name):
    """Feature, Mode and Ioctl are ``enum.IntFlag`` classes."""
    assert issubclass(getattr(uffd, name), enum.IntFlag)


def test_constant_member_names():
    """Each constant class has exactly the kernel names api.md lists, prefix dropped."""
    assert [m.name for m in uffd.Feature] == FEATURE_BITS
    assert [m.name for m in uffd.Mode] == ["MISSING", "WP", "MINOR"]
    assert [m.name for m in uffd.Ioctl] == list(IOCTL_BITS)


# -- section 2: Userfaultfd ----------------------------------------------------


def test_userfaultfd_init_signature():
    """Userfaultfd(features=Feature(0), *, nonblock, cloexec, user_mode_only, via) as api.md."""
    assert params(uffd.Userfaultfd.__init__) == [
        ("features", POS, Feature(0)),
        ("nonblock", KW, True),
        ("cloexec", KW, True),
        ("user_mode_only", KW, False),
        ("via", KW, "auto"),
    ]


RANGE_METHODS = {
    "register": [("addr", POS, EMPTY), ("length", POS, EMPTY), ("mode", POS, EMPTY)],
    "unregister": [("addr", POS, EMPTY), ("length", POS, EMPTY)],
    "copy": [
        ("dst", POS, EMPTY),
        ("src", POS, EMPTY),
        ("length", POS, EMPTY),
        ("wake", KW, True),
        ("wp", KW, False),
    ],
    "zeropage": [("addr", POS, EMPTY), ("length", POS, EMPTY), ("wake", KW, True)],
    "continue_": [
        ("addr", POS, EMPTY),
        ("length", POS, EMPTY),
        ("wake", KW, True),
        ("wp", KW, False),
    ],
    "poison": [("addr", POS, EMPTY), ("length", POS, EMPTY), ("wake", KW, True)],
    "move": [
        ("dst", POS, EMPTY),
        ("src", POS, EMPTY),
        ("length", POS, EMPTY),
        ("wake", KW, True),
        ("allow_src_holes", KW, False),
    ],
    "writeprotect": [
        ("addr", POS, EMPTY),
        ("length", POS, EMPTY),
        ("protect", POS, True),
        ("wake", KW, True),
    ],
    "wake": [("addr", POS, EMPTY), ("length", POS, EMPTY)],
    "read_events": [("max_events", POS, 64), ("timeout", POS, 0)],
}


@pytest.mark.parametrize("method", sorted(RANGE_METHODS))
def test_range_method_signature(method):
    """Each range method has api.md's parameter names, kinds and defaults."""
    assert params(getattr(uffd.Userfaultfd, method)) == RANGE_METHODS[method]


def test_userfaultfd_lifecycle_members():
    """``fileno``, ``close``, ``closed`` (a property) and the context manager exist."""
    cls = uffd.Userfaultfd
    assert callable(cls.fileno) and callable(cls.close)
    assert isinstance(inspect.getattr_static(cls, "closed"), property)
    assert callable(cls.__enter__) and callable(cls.__exit__)


def test_userfaultfd_handshake_attributes():
    """An open Userfaultfd has ``features``, ``available`` and ``ioctls`` of the flag types."""
    with uffd.Userfaultfd() as ufd:
        assert isinstance(ufd.features, uffd.Feature)
        assert isinstance(ufd.available, uffd.Feature)
        assert isinstance(ufd.ioctls, uffd.Ioctl)


# -- section 3: events ---------------------------------------------------------

EVENT_FIELDS = {
    "PageFault": ["address", "flags", "thread_id"],
    "Fork": ["uffd"],
    "Remap": ["old", "new", "length"],
    "Remove": ["start", "end"],
    "Unmap": ["start", "end"],
}


@pytest.mark.parametrize("name", sorted(EVENT_FIELDS))
def test_event_dataclass_fields(name):
    """Each event is a dataclass with api.md's fields, in order."""
    cls = getattr(uffd, name)
    assert dataclasses.is_dataclass(cls)
    assert [f.name for f in dataclasses.fields(cls)] == EVENT_FIELDS[name]


@pytest.mark.parametrize("name", sorted(EVENT_FIELDS))
def test_event_dataclass_is_frozen(name):
    """Events are frozen: assigning a field raises FrozenInstanceError."""
    cls = getattr(uffd, name)
    event = cls(*range(len(EVENT_FIELDS[name])))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(event, EVENT_FIELDS[name][0], 1)


def test_pagefault_flag_properties():
    """PageFault has the ``write``, ``wp`` and ``minor`` properties; thread_id defaults to None."""
    for prop in ("write", "wp", "minor"):
        assert isinstance(inspect.getattr_static(uffd.PageFault, prop), property)
    fault = uffd.PageFault(0x1000, 0)
    assert fault.thread_id is None
    assert (fault.write, fault.wp, fault.minor) == (False, False, False)


# -- section 4: errors ---------------------------------------------------------

ERROR_BASES = {
    "PageExistsError": "UffdError",
    "MappingChangedError": "UffdError",
    "NoMappingError": "UffdError",
    "ProcessGoneError": "UffdError",
    "UnsupportedError": "UffdError",
    "PageAccessError": "UffdError",
}


def test_uffd_error_is_an_oserror():
    """``UffdError`` derives from OSError (errno and strerror are kept)."""
    assert issubclass(uffd.UffdError, OSError)


@pytest.mark.parametrize("name", sorted(ERROR_BASES))
def test_error_subclass_bases(name):
    """Every error class of api.md derives from UffdError (and so from OSError)."""
    assert issubclass(getattr(uffd, name), uffd.UffdError)
    assert issubclass(getattr(uffd, name), OSError)


def test_mapping_changed_error_has_done_and_page_access_error_has_address():
    """MappingChangedError carries ``done``; PageAccessError carries ``address``."""
    err = uffd.MappingChangedError(11, "x", done=4096)
    assert err.done == 4096
    acc = uffd.PageAccessError("x", address=0x1234)
    assert acc.address == 0x1234


def test_permission_errors_are_the_builtin():
    """Permission failures use the builtin PermissionError, not a uffd-specific class."""
    assert not any(
        issubclass(getattr(uffd, n), PermissionError) for n in [*ERROR_BASES, "UffdError"]
    )
    import uffd._errors as errors

    with pytest.raises(PermissionError) as info:
        errors.check(-1, "UFFDIO_API")  # EPERM
    assert info.value.errno == 1
    assert "UFFDIO_API" in str(info.value)


# -- section 5: mem --------------------------------------------------------------

MEM_FUNCS = {
    "anon": [("length", POS, EMPTY), ("align", KW, None)],
    "shmem": [("length", POS, EMPTY), ("private", KW, False), ("align", KW, None)],
    "hugetlb": [("length", POS, EMPTY), ("private", KW, False), ("align", KW, None)],
}


@pytest.mark.parametrize("name", sorted(MEM_FUNCS))
def test_mem_function_signature(name):
    """``uffd.mem.anon/shmem/hugetlb`` have api.md's parameters and defaults."""
    assert params(getattr(mem, name)) == MEM_FUNCS[name]


def test_region_members(anon_region):
    """A Region has addr, length, page_size, kind and the alias/read/write/touch/close methods."""
    for attr, typ in (("addr", int), ("length", int), ("page_size", int), ("kind", str)):
        assert isinstance(getattr(anon_region, attr), typ), attr
    for method in ("alias", "read", "write", "touch", "close", "__enter__", "__exit__"):
        assert callable(getattr(anon_region, method)), method
    assert params(mem.Region.read) == [("offset", POS, EMPTY), ("n", POS, EMPTY)]
    assert params(mem.Region.write) == [("offset", POS, EMPTY), ("data", POS, EMPTY)]
    assert params(mem.Region.touch) == [
        ("offset", POS, EMPTY),
        ("n", POS, EMPTY),
        ("write", POS, False),
    ]


# -- section 6: probe ------------------------------------------------------------


def test_probe_signature_and_result_type():
    """``uffd.probe()`` takes no arguments and returns a ``uffd.Capabilities``."""
    assert params(uffd.probe) == []
    assert isinstance(uffd.probe(), uffd.Capabilities)


def test_submodules_of_the_contract_reachable_from_import_uffd():
    """``import uffd`` is enough for ``uffd.mem.anon`` and ``uffd.dirty.DirtyTracker`` (§5, §8)."""
    import subprocess
    import sys

    code = "import uffd; print(uffd.mem.anon.__name__, uffd.dirty.DirtyTracker.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["anon", "DirtyTracker"]


def test_gil_warning_in_the_public_docstrings():
    """api.md §2: the GIL warning (fork with EVENT_FORK, faults while holding the GIL) is stated
    where users read it."""
    for doc in (uffd.Userfaultfd.__doc__, uffd.Userfaultfd.read_events.__doc__):
        assert doc is not None and "GIL" in doc and "fork" in doc
