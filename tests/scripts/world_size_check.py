"""Run under `accelerate launch`: does this process see the world size the launcher started?

With `--cpu-flag yes` the Accelerator is created with cpu=True (what resnet_dist does without CUDA);
with `no` it is not, which on a CPU-only machine leaves each launched process alone in its own world.
Each process writes OUTDIR/rank<RANK>.json, then runs check_world_size: a mismatch exits 2 with
one "error: ..." line on stderr (resnet_dist.errors.run_cli).

usage: world_size_check.py yes|no OUTDIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from accelerate import Accelerator

from resnet_dist.distributed import check_world_size, end_run
from resnet_dist.errors import run_cli


def main(argv: list[str]) -> int:
    cpu_flag, outdir = argv
    accelerator = Accelerator(cpu=cpu_flag == "yes")
    seen = {
        "WORLD_SIZE": os.environ.get("WORLD_SIZE"),
        "num_processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
        "device": str(accelerator.device),
    }
    Path(outdir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
    try:
        check_world_size(accelerator)
    finally:
        end_run(accelerator)  # a gloo group left alive can abort the process at exit
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
