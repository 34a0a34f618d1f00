from resnet_dist.bench.cli import main
from resnet_dist.errors import run_cli

run_cli(main)
