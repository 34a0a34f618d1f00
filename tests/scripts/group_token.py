"""Run under `accelerate launch`: which launch did each member of this process group come from?

Each rank meets its peers through resnet_dist's bounded rendezvous (distributed.await_peers), joins the
Accelerator's group, and all-gathers TOKEN, a string unique to one launch. Rank 0 writes
OUTDIR/group.json: the gathered tokens and the rendezvous address. Launches that collided at
rendezvous would show a foreign token, a world of the wrong size, or hang.

usage: group_token.py TOKEN OUTDIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from resnet_dist.distributed import await_peers, check_world_size, end_run
from resnet_dist.errors import run_cli


def main(argv: list[str]) -> int:
    token, outdir = argv
    await_peers()
    accelerator = Accelerator(cpu=True)
    try:
        check_world_size(accelerator)
        tokens = gather_object([token])
        if accelerator.is_main_process:
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            Path(outdir, "group.json").write_text(json.dumps({"tokens": tokens, "store": where}))
    finally:
        end_run(accelerator)  # a gloo group left alive can abort the process at exit
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
