"""resnet-dist: train ResNet image classifiers on many processes from WebDataset shards."""

__version__ = "0.1.0"
