"""``python -m adaptive_lsgd.tools.bench``: the same as ``alsgd-bench``."""

import sys

from adaptive_lsgd.tools.bench.cli import main

sys.exit(main())
