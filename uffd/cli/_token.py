"""The shared token of the page server, read once for every subcommand."""

from __future__ import annotations

import os


class UsageError(Exception):
    """A command-line mistake: the subcommand exits with code 2."""


def read_token(path: str | None) -> bytes | None:
    """The token from ``--token-file PATH``, else from ``UFFD_TOKEN``, else None.

    Raises:
        UsageError: the file cannot be read or is empty (the message names it).
    """
    if path is None:
        env = os.environ.get("UFFD_TOKEN")
        return env.encode() if env else None
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as err:
        raise UsageError(f"cannot read the token file {path}: {err.strerror}") from None
    if not token:
        raise UsageError(f"the token file {path} is empty")
    return token
