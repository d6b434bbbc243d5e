"""The bench's reader of a child's output lines (PipeLines) over a real pipe."""

from __future__ import annotations

import os
import time

import pytest

from uffd.bench.restore_daemon import PipeLines


def test_two_lines_written_at_once_are_both_read_and_a_partial_line_times_out() -> None:
    """Two session reports in one write are both returned (the second was lost in a buffered
    file's buffer before); a line not yet ended times out instead of blocking; EOF gives ""."""
    read_end, write_end = os.pipe()
    try:
        lines = PipeLines(read_end)
        os.write(write_end, b'{"a": 1}\n{"b": 2}\n{"c"')
        assert lines.readline(5.0) == '{"a": 1}\n'
        assert lines.readline(5.0) == '{"b": 2}\n'
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            lines.readline(0.2)
        assert 0.15 < time.monotonic() - start < 5.0
        os.write(write_end, b": 3}\n")
        assert lines.readline(5.0) == '{"c": 3}\n'
        os.close(write_end)
        write_end = -1
        assert lines.readline(5.0) == ""
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
