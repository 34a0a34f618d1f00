"""The `accelerate launch` arguments of one node of a SLURM job, from SLURM's environment, one per line.

    mapfile -t ARGS < <(python launch/slurm_args.py) && accelerate launch "${ARGS[@]}" launch/train.py ...

launch/slurm_node.sh runs it on every node (inside srun, where SLURM_NODEID is that node's):
  --num_machines   SLURM_NNODES
  --machine_rank   SLURM_NODEID
  --num_processes  SLURM_NNODES x processes per node: PROCS_PER_NODE if set, else SLURM_GPUS_ON_NODE,
                   else 1 (a CPU node: one process, which uses every core)
  --main_process_ip    MAIN_ADDR if set, else the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`
                       expands it where scontrol exists; the parser below elsewhere)
  --main_process_port  MAIN_PORT if set, else 20000 + SLURM_JOB_ID % 20000: two jobs that share a first
                       node do not meet at one port, and every node of one job computes the same port
  --config_file        accelerate_configs/multi_node.yaml (static rendezvous, bf16; the file says why)

Standard library only: it runs before the training environment matters, and the tests run it as a script.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "accelerate_configs" / "multi_node.yaml"
BRACKET = re.compile(r"\[([^\[\]]*)\]")


class SlurmError(Exception):
    """SLURM's environment is missing or malformed: one line, exit 2."""


def split_top(nodelist: str) -> list[str]:
    """Split at the commas that are not inside brackets: `a[1,2],b` -> [`a[1,2]`, `b`]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise SlurmError(f"SLURM_JOB_NODELIST {nodelist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise SlurmError(f"SLURM_JOB_NODELIST {nodelist!r}: unbalanced brackets")
    return [*parts, nodelist[start:]]


def expand_one(name: str, nodelist: str) -> list[str]:
    """`node[01-03,07]` -> node01 node02 node03 node07; several groups (`r[1-2]-n[1-2]`) multiply out.
    Zero padding follows the range's lower bound, as SLURM writes it."""
    match = BRACKET.search(name)
    if not match:
        return [name]
    head, tails = name[: match.start()], expand_one(name[match.end() :], nodelist)
    hosts = []
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or not (hi or lo).isdigit() or int(hi or lo) < int(lo):
            raise SlurmError(f"SLURM_JOB_NODELIST {nodelist!r}: {part!r} is not a number or a range")
        hosts += [f"{head}{n:0{len(lo)}d}{tail}" for n in range(int(lo), int(hi or lo) + 1) for tail in tails]
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, expanded in order."""
    hosts = [host for name in split_top(nodelist.strip()) if name for host in expand_one(name, nodelist)]
    if not hosts:
        raise SlurmError("SLURM_JOB_NODELIST is empty")
    return hosts


def first_host(nodelist: str) -> str:
    """SLURM's own expansion where scontrol exists (it knows every syntax), else ours."""
    if shutil.which("scontrol"):
        shown = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if shown.returncode != 0 or not shown.stdout.split():
            raise SlurmError(f"scontrol show hostnames {nodelist}: {shown.stderr.strip() or 'no hosts'}")
        return shown.stdout.split()[0]
    return expand_nodelist(nodelist)[0]


def number(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    raw = env.get(name, default)
    if raw is None:
        raise SlurmError(f"{name} is not set: run this inside a SLURM job (sbatch launch/slurm.sbatch)")
    # SLURM writes per-node counts of heterogeneous jobs as "8(x2)"; the first count is this node's.
    match = re.fullmatch(r"(\d+)(\(x\d+\))?", raw.strip())
    if not match:
        raise SlurmError(f"{name}={raw!r}: expected a whole number")
    return int(match.group(1))


def launch_args(env: Mapping[str, str]) -> list[str]:
    nodes, node = number(env, "SLURM_NNODES"), number(env, "SLURM_NODEID")
    per_node = number(env, "PROCS_PER_NODE", env.get("SLURM_GPUS_ON_NODE") or "1")
    if node >= nodes or per_node < 1:
        raise SlurmError(f"SLURM_NODEID={node} with SLURM_NNODES={nodes}, {per_node} processes per node")
    addr = env.get("MAIN_ADDR") or first_host(env.get("SLURM_JOB_NODELIST") or "")
    port = number(env, "MAIN_PORT") if env.get("MAIN_PORT") else 20000 + number(env, "SLURM_JOB_ID") % 20000
    return [
        "--config_file",
        str(CONFIG),
        "--num_machines",
        str(nodes),
        "--num_processes",
        str(nodes * per_node),
        "--machine_rank",
        str(node),
        "--main_process_ip",
        addr,
        "--main_process_port",
        str(port),
    ]


def main() -> int:
    try:
        args = launch_args(os.environ)
    except SlurmError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write("\n".join(args) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
