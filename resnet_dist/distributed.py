"""Launch sanity checks and synchronized BatchNorm for every device, CPU (gloo) included."""

from __future__ import annotations

import atexit
import gc
import os
import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resnet_dist.errors import TrainingError, UsageError

ENV_RENDEZVOUS_TIMEOUT = "RESNET_DIST_RENDEZVOUS_TIMEOUT"
# Seconds each rank may take to reach the launcher's store and meet every other rank. 300 s covers a cold
# start of many ranks on a loaded machine; a wrong port or a rank that never started then fails within
# minutes, not after torch's own wait (the collective timeout: 30 min by default).
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0


def check_world_size(accelerator) -> None:
    """Refuse to run when processes were launched but did not join one group.

    Each process would then train its own model on its share of the data and nothing would say so:
    the worst failure of a distributed run, so it is an error, not a warning.
    """
    try:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return  # not set by a launcher we know; nothing to compare against
    if launched > 1 and accelerator.num_processes != launched:
        raise UsageError(
            f"launched {launched} processes (WORLD_SIZE={launched}) but this one sees "
            f"{accelerator.num_processes}: they did not join one process group; on a CPU-only machine launch with "
            "accelerate_configs/cpu_ddp.yaml and create the Accelerator with cpu=True (that file says why)"
        )


def rendezvous_timeout() -> float:
    raw = os.environ.get(ENV_RENDEZVOUS_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_RENDEZVOUS_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:  # also refuses nan
        raise UsageError(f"{ENV_RENDEZVOUS_TIMEOUT} must be a number of seconds > 0, got {raw!r}")
    return value


def await_peers() -> None:
    """Meet every launched rank at the launcher's store, within a bounded wait, before the process group forms.

    Without it a rank waits in torch's rendezvous as long as the collective timeout when a peer never
    starts, and forever when something other than a store listens at MASTER_PORT (a TCPStore client
    connects, then waits for an answer that never comes): a job that hangs without a word. Raises
    TrainingError naming the address, the wait and what is missing. Does nothing without a launcher.
    """
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return  # not a launcher we know; check_world_size speaks about the world later
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if world < 2 or not addr or not port.isdigit() or dist.is_initialized():
        return
    wait = rendezvous_timeout()
    state = {"stage": "nothing listens there (is the launcher alive?)"}
    args = (addr, int(port), rank, world, time.monotonic() + wait, state)
    meet = threading.Thread(target=_meet, args=args, name="rendezvous", daemon=True)
    meet.start()
    meet.join(wait + 1)  # _meet keeps the deadline itself, except inside a TCPStore handshake that never ends
    if not state.get("done"):
        raise TrainingError(
            f"no rendezvous at {addr}:{port} within {wait:g} s: {state['stage']}; "
            f"{ENV_RENDEZVOUS_TIMEOUT} sets the wait"
        )


def accelerate_backend(on_cpu: bool) -> str:
    """The backend Accelerate picks under torchrun: NCCL on CUDA; on the CPU, MPI where torch has it, else gloo."""
    if not on_cpu:
        return "nccl"
    return "mpi" if dist.is_mpi_available() else "gloo"


def join_attempt_group(backend: str, timeout: timedelta) -> None:
    """Form the default process group on keys of this torchrun attempt only, before Accelerate forms one.

    torchrun keeps one store for the whole job, restarts included (its agent serves it at MASTER_PORT), and
    torch's env:// rendezvous keys the group's members there by group name alone. After a restart the new
    ranks can read the addresses the dead attempt left there: gloo then fails with "Connection refused"
    to a port of the old attempt, or hangs (shown with ../shared/probes/restart_probe.py: 2 restarts in 5
    recovered without this, 5 in 5 with it). A prefix per attempt gives each attempt fresh keys; Accelerate
    then finds the group formed and uses it. Does nothing outside torchrun or when the group exists.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    # Only the agent's store outlives an attempt; a store that rank 0 serves itself dies with it.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if attempt is None or not agent_store or not addr or not port.isdigit() or dist.is_initialized():
        return
    if backend == "mpi":  # MPI ranks meet through mpirun, not through the store
        return
    store = dist.TCPStore(addr, int(port), is_master=False, timeout=timeout)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"resnet_dist/attempt_{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


def _meet(addr: str, port: int, rank: int, world: int, deadline: float, state: dict) -> None:
    """Connect to the store, leave this rank's mark, wait for all `world` marks; `state` says how far it got."""
    try:
        while not _accepts(addr, port, deadline):
            if time.monotonic() >= deadline:
                return
            time.sleep(0.2)
        state["stage"] = "something listens there but does not answer as a rendezvous store (another program's port?)"
        left = timedelta(seconds=max(deadline - time.monotonic(), 1))
        store = dist.TCPStore(addr, port, is_master=False, timeout=left, wait_for_workers=False)
        elastic = (os.environ.get("TORCHELASTIC_RUN_ID", "run"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        prefix = "resnet_dist/{}/restart-{}/arrived".format(*elastic)  # a restarted job meets afresh
        store.set(f"{prefix}/{rank}", "1")
        store.add(f"{prefix}/count", 1)
        while store.add(f"{prefix}/count", 0) < world:  # one store call a poll, however many ranks
            if time.monotonic() >= deadline:
                missing = [r for r in range(world) if not store.check([f"{prefix}/{r}"])]
                named = ", ".join(map(str, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                state["stage"] = f"rank {named} of {world} never arrived (did it start? see its log)"
                return
            time.sleep(0.2)
        state["done"] = True
    except Exception as exc:  # the store refused us or went away; say so in the one line
        state["stage"] += f" ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"


def _accepts(addr: str, port: int, deadline: float) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=max(min(deadline - time.monotonic(), 5), 0.1)):
            return True
    except OSError:
        return False


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum is the sum of the ranks' gradients.

    torch.distributed.nn.functional.all_reduce does the same and works with gloo, but it is deprecated
    (a FutureWarning on every call as of torch 2.14) and its suggested replacement lives in a private
    module; these few lines on the public dist.all_reduce work on every torch this project admits.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are over the whole global batch, on any device gloo can reduce.

    Why it exists: torch.nn.SyncBatchNorm raises on CPU tensors, and this project runs its distributed
    tests and demo with 2 CPU processes over gloo. Per channel it all-reduces the sum, the sum of squares
    and the count (one collective per layer); autograd flows through the all-reduce, so the backward
    pass sums the gradient terms across ranks the way torch's SyncBatchNorm backward does.
    Outside training, or without a process group of 2+ ranks, it is exactly a plain BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (batch, channels, ...), got {x.dim()}D")

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or self._world_size() == 1:
            return super().forward(x)

        dims = [0, *range(2, x.dim())]  # every dim but channels
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast per-channel stats over x
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float64, device=x.device)
        # float64 sums: var = E[x^2] - E[x]^2 cancels badly in float32 when |mean| >> std.
        local = torch.cat([xf.sum(dims, dtype=torch.float64), (xf * xf).sum(dims, dtype=torch.float64), count])
        total = _AllReduceSum.apply(local, self.process_group or dist.group.WORLD)
        c = self.num_features
        n = total[2 * c]
        if not torch.compiler.is_compiling() and n.item() <= 1:  # .item() would break a compiled graph
            raise ValueError(f"expected more than 1 value per channel when training, got {int(n.item())} globally")
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises with

        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n.detach() / (n.detach() - 1))

        y = (xf - mean.to(xf.dtype).view(shape)) * torch.rsqrt(var.to(xf.dtype).view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        # The same rule as BatchNorm: an exponential average, or a cumulative one when momentum is None.
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)

    @classmethod
    def convert(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm in `module` (recursively) by a CPUSyncBatchNorm sharing its tensors."""
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            out = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
            )
            # Share, not copy: the optimizer may already hold these parameters, and trained stats carry over.
            out.weight, out.bias = module.weight, module.bias
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, cls.convert(child, process_group))
        return out


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def convert_sync_batchnorm(model: nn.Module, process_group=None, device: torch.device | str | None = None) -> nn.Module:
    """Turn every BatchNorm (1d/2d/3d) of `model` into one synchronized across processes.

    Picks by device (the model's, or `device`): torch.nn.SyncBatchNorm off the CPU (CUDA/NCCL), our
    CPUSyncBatchNorm on the CPU. Weights and buffers are kept. Call it before `accelerator.prepare`,
    so that DDP wraps the converted modules. Returns the model (the root itself is replaced if it is a BN).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type == "cpu":
        return CPUSyncBatchNorm.convert(model, process_group)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)


def end_run(accelerator) -> None:
    """Close trackers and the process group with every rank at the same point.

    A rank that destroys its gloo group while a peer is still busy (writing the summary, say) can make
    that peer abort at exit with "terminate called without an active exception": meet first, then close.
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()
    # A DDP wrapper still unreachable-but-uncollected (in a reference cycle) when the interpreter finalizes
    # is freed then, and its reducer's gloo threads can abort the process with that same message after a
    # clean run. Collect once the caller's frames are gone and before finalization (README: Preemption).
    atexit.register(gc.collect)
