"""Measure EVA's cost on a MiniGrid transfer; prints one JSON object as the last line (same as `eva-rl bench`).

python scripts/bench.py                 # DoorKey-5x5 agent (20k steps) -> EVA on DoorKey-8x8
python scripts/bench.py --device cuda
"""

import sys

from eva_rl.experiments.cli import bench_main

if __name__ == "__main__":
    sys.exit(bench_main())
