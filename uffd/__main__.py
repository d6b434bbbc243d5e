"""``python -m uffd``."""

import sys

from uffd.cli import main

sys.exit(main())
