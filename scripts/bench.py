"""Measure EVA's cost on a MiniGrid transfer; prints one JSON object as the last line.

python scripts/bench.py                 # DoorKey-5x5 agent (20k steps) -> EVA on DoorKey-8x8
python scripts/bench.py --device cuda
"""

from __future__ import annotations

import argparse
import json

import torch

from eva_rl.bench import measure_eva_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-env", default="MiniGrid-DoorKey-5x5-v0")
    parser.add_argument("--target-env", default="MiniGrid-DoorKey-8x8-v0")
    parser.add_argument("--pretrain-steps", type=int, default=20_000)
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rho", type=float, default=2.0)
    parser.add_argument("--tau", type=float, default=0.99)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--throughput-steps", type=int, default=2048, help="PPO steps per timing round; 0 skips")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for small nets)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures = measure_eva_cost(
        args.source_env,
        args.target_env,
        args.pretrain_steps,
        args.n_envs,
        args.rank,
        args.rho,
        args.tau,
        args.batch_size,
        args.seed,
        args.device,
        args.throughput_steps,
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
