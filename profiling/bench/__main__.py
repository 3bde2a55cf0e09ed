"""``python -m profiling.bench``, run from the repository root (so that the checkout's pfedmoap is the one measured)."""

import sys

from .cli import main

sys.exit(main())
