"""Render a task's runs (eval return and training return per method) from its TensorBoard event files.

python scripts/plot_runs.py runs/MiniGrid-DoorKey --out docs/images/doorkey.png
"""

import argparse
from pathlib import Path

from eva_rl.experiments.plots import plot_runs

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("board", type=Path, help="<log-dir>/<task>")
    parser.add_argument("--out", type=Path, default=Path("runs.png"))
    args = parser.parse_args()
    print(plot_runs(args.board, args.out))
