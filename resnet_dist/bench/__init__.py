"""The benchmark: python -m resnet_dist.bench SUITE (see cli.py). Nothing outside this package imports it."""
