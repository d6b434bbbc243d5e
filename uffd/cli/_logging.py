"""Log set-up shared by the long-running commands (``serve``, ``handler``)."""

from __future__ import annotations

import logging
import sys


def configure_logging(verbose: int, fmt: str) -> None:
    """Log to stderr in ``fmt``: warnings by default, ``-v`` info, ``-vv`` debug."""
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
