"""``python -m adaptive_lsgd.tools.cluster``: see :mod:`adaptive_lsgd.tools.cluster.cli`."""

import sys

from adaptive_lsgd.tools.cluster.cli import main

sys.exit(main())
