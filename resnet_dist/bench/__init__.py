"""The benchmark, python -m resnet_dist.bench SUITE: one module per suite, cli.py for the command line.

A leaf: nothing else in the package, nor launch/, imports it (tests/test_bench.py checks).
"""
