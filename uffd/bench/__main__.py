"""``python -m uffd.bench``: the benchmark suite (the same as ``python -m uffd bench``)."""

import sys

from uffd.bench.suite import main

sys.exit(main())
