"""Entry point: `accelerate launch [--config_file accelerate_configs/X.yaml] launch/train.py --data DIR --out RUN_DIR`.

All logic lives in resnet_dist; this file only hands the command line to it.
"""

from resnet_dist.errors import run_cli
from resnet_dist.trainer import main

if __name__ == "__main__":
    run_cli(main)
