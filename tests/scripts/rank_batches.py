"""Under `accelerate launch`: each rank streams one train epoch and writes what it saw to OUT/rank-R.json."""

import hashlib
import json
import sys
from pathlib import Path

from accelerate import Accelerator

from resnet_dist.data import ShardStream, make_loader
from resnet_dist.distributed import end_run
from resnet_dist.storage import read_index


def main() -> None:
    data, out, workers, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    acc = Accelerator(cpu=True)
    index = read_index(data)
    stream = ShardStream(
        data, index, "train", batch_size=batch, rank=acc.process_index, world_size=acc.num_processes, train=True, seed=0
    )
    stream.set_epoch(0)
    images = [
        hashlib.sha1(img.numpy().tobytes()).hexdigest()
        for x, *_ in make_loader(stream, workers, pin_memory=False)
        for img in x
    ]
    (out / f"rank-{acc.process_index}.json").write_text(
        json.dumps({"world_size": acc.num_processes, "batches": len(images) // batch, "images": images})
    )
    end_run(acc)


# Loader workers start from a forkserver, which imports this file again: only the guard keeps them from
# running it.
if __name__ == "__main__":
    main()
