"""Run under `accelerate launch` with 2 CPU processes: does synchronized BatchNorm equal one big BatchNorm?

Every rank builds the same models and the same global batches (same seed), runs the converted model on
its own slice, and compares with a plain BatchNorm run over the whole batch. A control run with
unconverted BatchNorm shows the comparison can fail. Rank 0 writes the worst differences to
OUTDIR/syncbn.json for tests/test_distributed.py to assert on.

usage: syncbn_check.py OUTDIR
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from resnet_dist.distributed import CPUSyncBatchNorm, check_world_size, convert_sync_batchnorm, end_run

STEPS = 2  # two batches: the running stats' second update starts from a non-default value


def make_case(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A layer before the BN so input gradients pass through it; random affine so weight grads mean something."""
    if name == "bn2d":  # global batch 7 on 2 ranks: uneven slices (4 + 3) test the count weighting
        model, shape = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), (7, 3, 5, 5)
    elif name == "bn1d":  # 2D input, cumulative average (momentum=None)
        model, shape = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, momentum=None)), (10, 5)
    elif name == "bn1d_seq":  # 3D input (batch, channels, length)
        model, shape = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3, momentum=0.3)), (6, 2, 9)
    elif name == "bn3d_no_affine":
        model, shape = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3, affine=False)), (4, 2, 3, 3, 3)
    else:
        raise ValueError(name)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)
    return model, shape


def my_slice(n: int, rank: int, world: int) -> slice:
    bounds = [n * r // world for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst absolute difference, relative for values above 1 (gradients summed over many terms grow)."""
    if not a.numel():
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1)).item()


def run_case(name: str, sync: bool, rank: int, world: int) -> dict[str, float]:
    torch.manual_seed(0)
    reference, shape = make_case(name)
    model = convert_sync_batchnorm(copy.deepcopy(reference)) if sync else copy.deepcopy(reference)
    if sync:
        assert any(isinstance(m, CPUSyncBatchNorm) for m in model.modules())
    diffs = {"output": 0.0, "input_grad": 0.0}
    for _ in range(STEPS):
        x = torch.randn(shape)
        x_ref = x.clone().requires_grad_()
        out_ref = reference(x_ref)
        weights = torch.randn_like(out_ref)  # loss = sum(out * weights): a sum over samples, so the
        (out_ref * weights).sum().backward()  # global loss is the sum of the ranks' losses

        part = my_slice(shape[0], rank, world)
        x_mine = x[part].clone().requires_grad_()
        out = model(x_mine)
        (out * weights[part]).sum().backward()
        diffs["output"] = max(diffs["output"], max_diff(out, out_ref[part]))
        diffs["input_grad"] = max(diffs["input_grad"], max_diff(x_mine.grad, x_ref.grad[part]))

    for (pname, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)  # each rank holds its part of the global gradient
        diffs[f"grad.{pname}"] = max_diff(grad, p_ref.grad)
    for (bname, b), b_ref in zip(model.named_buffers(), reference.buffers()):
        diffs[f"buffer.{bname}"] = max_diff(b, b_ref)
    for key, value in diffs.items():  # the worst rank counts
        t = torch.tensor(value)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        diffs[key] = t.item()
    return diffs


def run_ddp_case(accelerator: Accelerator, world: int) -> dict[str, float]:
    """The training path: convert, then prepare (DDP averages gradients, broadcasts buffers)."""
    torch.manual_seed(0)
    reference, shape = make_case("bn2d")
    shape = (8,) + shape[1:]  # DDP averages per-rank gradients, so give ranks equal shares
    model = accelerator.prepare(convert_sync_batchnorm(copy.deepcopy(reference)))
    x = torch.randn(shape)
    out_ref = reference(x)
    weights = torch.randn_like(out_ref)
    (out_ref * weights).sum().backward()
    part = my_slice(shape[0], accelerator.process_index, world)
    out = model(x[part])
    # Scaling by world size turns DDP's average of the ranks' gradients into the sum the reference computed.
    ((out * weights[part]).sum() * world).backward()
    diffs = {"output": max_diff(out, out_ref[part])}
    inner = accelerator.unwrap_model(model)
    for (pname, p), p_ref in zip(inner.named_parameters(), reference.parameters()):
        diffs[f"grad.{pname}"] = max_diff(p.grad, p_ref.grad)
    for (bname, b), b_ref in zip(inner.named_buffers(), reference.buffers()):
        diffs[f"buffer.{bname}"] = max_diff(b, b_ref)
    return diffs


def main(outdir: str) -> None:
    accelerator = Accelerator(cpu=True)  # without cpu=True, on a machine without CUDA each process is alone
    check_world_size(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    result = {
        "world_size": world,
        "backend": dist.get_backend(),
        "ranks": [None] * world,
        "sync": {c: run_case(c, True, rank, world) for c in ("bn2d", "bn1d", "bn1d_seq", "bn3d_no_affine")},
        "unsynced": {c: run_case(c, False, rank, world) for c in ("bn2d", "bn1d")},
        "ddp": run_ddp_case(accelerator, world),
    }
    dist.all_gather_object(result["ranks"], rank)
    if accelerator.is_main_process:
        Path(outdir, "syncbn.json").write_text(json.dumps(result, indent=1))
    end_run(accelerator)  # a gloo group left alive can abort the process at exit


if __name__ == "__main__":
    main(sys.argv[1])
