"""What the world-size-independent sample order costs a loader worker: CPU seconds per delivered image.

Micro-batches of all ranks and workers interleave, so a worker's samples lie all over the epoch's stream.
With per-sample tables a worker reads only its own samples' byte ranges (resnet_dist.data.SeekReader);
without them it reads (fetches, checks, walks the tar of) every shard its micro-batches span, which is the
whole stream, and its CPU per delivered image falls with processes x workers. Measured in
this process, as worker 0 of W of rank 0 (the DataLoader's worker info faked), over one train epoch:
CPU time, not wall time, so other jobs on the machine do not blur it.

    python -m resnet_dist.bench.elastic shards/fashion-mnist [--batch 256]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import SimpleNamespace

from rich.console import Console

import resnet_dist.data as data
from resnet_dist.errors import OneLineParser, run_cli
from resnet_dist.storage import read_index

SPLITS = [(1, 1), (1, 2), (2, 2), (4, 2)]  # (processes, workers per process)


def worker_rate(base: str, world: int, workers: int, batch: int) -> tuple[int, float]:
    """(images delivered, CPU seconds) of worker 0 of `workers`, rank 0 of `world`, one epoch."""
    index = read_index(base)
    fake = SimpleNamespace(id=0, num_workers=workers)  # stands in for torch's WorkerInfo, read by _worker()
    real, data.get_worker_info = data.get_worker_info, lambda: fake
    try:
        stream = data.ShardStream(base, index, "train", batch_size=batch, rank=0, world_size=world, train=True)
        stream.set_epoch(1)
        start = time.process_time()
        n = sum(images.shape[0] for images, *_ in stream)
        return n, time.process_time() - start
    finally:
        data.get_worker_info = real


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m resnet_dist.bench.elastic", description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    for world, workers in SPLITS:
        n, cpu = worker_rate(args.data, world, workers, args.batch)
        Console(highlight=False).print(
            f"{world} processes x {workers} workers: worker 0 delivered {n} images in {cpu:.2f} CPU s, {n / cpu:.0f}/s"
        )


if __name__ == "__main__":
    run_cli(main)
