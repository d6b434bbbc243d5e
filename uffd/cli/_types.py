"""argparse types that check a value when the command line is parsed.

A bad value is a usage error (exit 2) that names the flag and the range,
before any socket is bound or any fd handed over.
"""

from __future__ import annotations

import argparse
import math


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seconds(text: str) -> float:
    """A finite, positive duration in seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def page_size(text: str) -> int:
    """A snapshot page size: a power of two from 512 bytes to 1 GiB."""
    value = _int(text)
    if value < 512 or value > 1 << 30 or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"must be a power of two from 512 to 1073741824 (1 GiB), got {value}"
        )
    return value


def address_range(text: str) -> tuple[int, int]:
    """``ADDR:LEN``: an address and a length in bytes (decimal, or 0x hex), LEN at least 1."""
    addr_text, sep, length_text = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"must be ADDR:LEN (e.g. 0x7f0000000000:0x10000), got {text!r}"
        )
    addr, length = _int(addr_text), _int(length_text)
    if addr < 0 or length < 1:
        raise argparse.ArgumentTypeError(f"needs ADDR >= 0 and LEN >= 1, got {text!r}")
    return addr, length
