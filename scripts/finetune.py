"""Fine-tune a pretrained SB3 agent (PPO, A2C, SAC, TD3, DQN) with EVA-initialized LoRA, beside full fine-tuning,
on a target env.

python scripts/finetune.py --env MiniGrid-DoorKey
python scripts/finetune.py --help
"""

import sys

from eva_rl.experiments.cli import finetune_main

if __name__ == "__main__":
    sys.exit(finetune_main())
