"""Run a suite of transfer tasks (methods x seeds), then write IQM tables with CIs and plots.

python scripts/compare.py --suite doorkey --methods scratch,full,lora,eva --seeds 0 1 2 --workers 2
"""

import sys

from eva_rl.experiments.cli import compare_main

if __name__ == "__main__":
    sys.exit(compare_main())
