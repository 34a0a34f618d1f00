#!/usr/bin/env bash
# One node of a SLURM job (launch/slurm.sbatch runs it through srun on every node, from the repository root):
# `accelerate launch` with this node's arguments (launch/slurm_args.py), and SIGUSR1 passed to the ranks.
#
# Why the launcher ignores SIGUSR1: it is torchrun, which handles SIGTERM/SIGINT but not SIGUSR1, whose
# default action kills it and leaves its ranks orphaned. The ranks install their own handler
# (resnet_dist/guard.py), and this script sends them the signal it receives: its launcher's children are
# the ranks. A signal sent to every process of the step reaches them directly too; a rank counts it once.
set -uo pipefail
PYTHON=${PYTHON:-python3}
ARGS_TEXT=$("$PYTHON" launch/slurm_args.py) || exit 2   # its one `error:` line is already on stderr
mapfile -t ARGS <<<"$ARGS_TEXT"

(trap '' USR1 && exec "$PYTHON" -m accelerate.commands.launch "${ARGS[@]}" launch/train.py "$@") &
LAUNCHER=$!
forwarded=0
trap 'forwarded=1; pkill -USR1 -P "$LAUNCHER"' USR1
wait "$LAUNCHER" && code=0 || code=$?
while [ "$forwarded" = 1 ]; do  # a trapped signal ends `wait` early: wait again for the real exit code
  forwarded=0
  wait "$LAUNCHER" && code=0 || code=$?
done
exit "$code"
