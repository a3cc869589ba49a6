"""``python -m eva_rl <command>``, the same as the ``eva-rl`` command."""

import sys

from eva_rl.experiments.cli import main

sys.exit(main())
