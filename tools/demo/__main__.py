"""``python -m adaptive_lsgd.tools.demo``: see :mod:`adaptive_lsgd.tools.demo.train`."""

import sys

from adaptive_lsgd.tools.demo.train import main

sys.exit(main())
