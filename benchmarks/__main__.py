"""``python -m kvt.benchmarks``."""

import sys

from .cli import main

sys.exit(main())
