"""Entry point: `accelerate launch [--config_file accelerate_configs/X.yaml] launch/train.py --data DIR --out RUN_DIR`.

All logic lives in resnet_dist; this file only parses the config and calls fit.
"""

from resnet_dist.config import parse_args
from resnet_dist.errors import run_cli
from resnet_dist.trainer import fit


def main(argv=None) -> int:
    fit(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
