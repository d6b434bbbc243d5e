"""``python -m uffd.bench``: the benchmark suite (the same as ``python -m uffd bench``)."""

import sys

from uffd.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
