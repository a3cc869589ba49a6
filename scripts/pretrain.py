"""Train a task's source agent reproducibly and write it, with a model card, to agents/<env id>/.

python scripts/pretrain.py --env MiniGrid-DoorKey
"""

import sys

from eva_rl.experiments.cli import pretrain_main

if __name__ == "__main__":
    sys.exit(pretrain_main())
