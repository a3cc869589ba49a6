"""Render a task's runs (eval return and training return per method) from its TensorBoard event files.

python scripts/plot_runs.py runs/MiniGrid-DoorKey --out docs/images/doorkey.png
"""

import sys

from eva_rl.experiments.cli import plot_runs_main

if __name__ == "__main__":
    sys.exit(plot_runs_main())
