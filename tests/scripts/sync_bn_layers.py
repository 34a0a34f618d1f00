"""Run under `accelerate launch` with the trainer's own flags: which BatchNorm layers does a run train with?

The run is set up exactly as launch/train.py sets it up (resnet_dist.trainer.setup: build, convert,
prepare), then one training-mode forward feeds each rank different images. Rank 0 writes to
OUTDIR/sync_bn_layers.json the BatchNorm classes of the model and how far apart the ranks' running
means of the first BatchNorm ended up: synchronized layers all saw the same global batch statistics.

usage: sync_bn_layers.py OUTDIR TRAINER-FLAGS...
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from resnet_dist.config import parse_args
from resnet_dist.distributed import end_run
from resnet_dist.engine import bare
from resnet_dist.trainer import setup


def main(outdir: str, argv: list[str]) -> None:
    cfg, _ = parse_args(argv)
    run = setup(cfg)
    acc = run.step.accelerator
    model = bare(acc, run.step.model)
    layers = Counter(type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm))
    h, w = run.index.image_size
    torch.manual_seed(100 + acc.process_index)  # each rank its own images: local statistics differ
    images = torch.randint(0, 256, (8, h, w, run.index.channels), dtype=torch.uint8, device=acc.device)
    run.step.model.train()
    run.step.model(run.step.augment.eval(images))
    first = next(m for m in model.modules() if isinstance(m, _BatchNorm))
    means = [torch.zeros_like(first.running_mean) for _ in range(acc.num_processes)]
    dist.all_gather(means, first.running_mean.detach().contiguous())
    if acc.is_main_process:
        spread = max((m - means[0]).abs().max().item() for m in means)
        moved = means[0].abs().max().item()  # running means start at 0: the forward did update them
        result = {"world_size": acc.num_processes, "layers": dict(layers), "rank_spread": spread, "moved": moved}
        Path(outdir, "sync_bn_layers.json").write_text(json.dumps(result, indent=1))
    end_run(acc)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
