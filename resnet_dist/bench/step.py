"""The step suite: our train_step through Accelerate vs a plain PyTorch loop written like the notebooks.

Same model, batch and precision, data already in memory (compute only); bf16 + channels_last vs fp32
NCHW where the hardware has native bf16; with --compile, torch.compile vs eager.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from resnet_dist.augment import BatchAugment
from resnet_dist.bench.common import console, device, fast_precision, interleaved, make_row, say


@dataclass
class StepSetup:
    """One way of running the training step: ours (through Accelerate) or the notebook loop."""

    precision: str  # "no" (fp32) | "bf16"
    channels_last: bool
    compile: bool = False


def build_net(args, num_classes: int, channels: int, channels_last: bool) -> torch.nn.Module:
    from resnet_dist.models import build_model

    torch.manual_seed(0)
    model = build_model(
        args.model, num_classes=num_classes, in_channels=channels, stem=args.stem, width=args.width or None
    )
    return model.to(device(), memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def fresh_accelerator(precision: str):
    """A new Accelerator with `precision`: Accelerate keeps one global state, so it is reset first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=precision, step_scheduler_with_optimizer=False
    )


def make_step(acc, model, optimizer, scheduler, augment: BatchAugment):
    """The trainer's own engine.Step around a prepared model (the trainer's Run needs shards and a run folder)."""
    from resnet_dist.engine import Step
    from resnet_dist.guard import StepGuard, StopRequest

    guard = StepGuard(acc, StopRequest(), max_bad_steps=0)  # timed as the trainer runs it
    return Step(acc, model, optimizer, scheduler, augment, guard, label_smoothing=0.0)


def our_step_timer(
    args, setup: StepSetup, images: torch.Tensor, labels: torch.Tensor, mean, std
) -> Callable[[], float]:
    """Times engine.train_step, the trainer's own step, around a prepared model."""
    from resnet_dist.engine import train_step

    model = build_net(args, 10, images.shape[-1], setup.channels_last)
    if setup.compile:
        model = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(0)

    def timed(steps: int) -> float:
        acc = fresh_accelerator(setup.precision)
        net, opt = acc.prepare(model, optimizer)
        step = make_step(acc, net, opt, scheduler, BatchAugment(mean, std, acc.device, 4, True, setup.channels_last))
        xs, ys = images.to(acc.device), labels.to(acc.device)  # the trainer copies each batch before its step
        net.train()
        start = time.perf_counter()
        for i in range(steps):
            loss, _ = train_step(step, xs[i % len(xs)], ys[i % len(ys)], generator)
        loss.item()  # wait for the last step on asynchronous devices
        return steps * images.shape[1] / (time.perf_counter() - start)

    return timed


def notebook_step_timer(
    args, setup: StepSetup, images: torch.Tensor, labels: torch.Tensor, mean, std
) -> Callable[[], float]:
    """The notebooks' loop: batches already augmented and normalised (their DataLoader did it), then
    zero_grad, forward, loss, backward, step. Autocast/channels_last only when `setup` asks."""
    model = build_net(args, 10, images.shape[-1], setup.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
    ready = [
        ((x.permute(0, 3, 1, 2).float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
        .contiguous(memory_format=fmt)
        .to(device())
        for x in images
    ]
    targets = [y.to(device()) for y in labels]
    autocast = dict(device_type=device().type, dtype=torch.bfloat16, enabled=setup.precision == "bf16")

    def timed(steps: int) -> float:
        model.train()
        start = time.perf_counter()
        for i in range(steps):
            x, y = ready[i % len(ready)], targets[i % len(targets)]
            optimizer.zero_grad()
            with torch.autocast(**autocast):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        loss.item()
        return steps * x.shape[0] / (time.perf_counter() - start)

    return timed


def step_data(args, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A few distinct uint8 NHWC batches and labels, in memory (the step suite measures compute only)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, args.step_batch, size, size, channels), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (4, args.step_batch), generator=g)
    return images, labels, torch.full((channels,), 0.5), torch.full((channels,), 0.25)


def step_suite(args) -> list[dict]:
    images, labels, mean, std = step_data(args, args.step_channels, args.step_size)
    fast = fast_precision()
    setups = {"ours fp32": StepSetup("no", False), "notebook fp32": StepSetup("no", False)}
    if fast == "bf16":
        setups |= {"ours fast": StepSetup("bf16", True), "notebook fast": StepSetup("bf16", True)}
    timers = {
        name: (our_step_timer if name.startswith("ours") else notebook_step_timer)(args, s, images, labels, mean, std)
        for name, s in setups.items()
    }
    for timer in timers.values():
        timer(args.warmup)
    rates = interleaved({name: functools.partial(timer, args.batches) for name, timer in timers.items()}, args.repeats)
    size = f"{args.step_size}x{args.step_size}x{args.step_channels}"
    model = f"{args.model} width {args.width or 'default'}, {size}, batch {args.step_batch}"
    rows = [
        make_row(
            "step",
            "overhead, fp32 NCHW",
            rates["ours fp32"],
            rates["notebook fp32"],
            "plain PyTorch loop, fp32 NCHW",
            "img/s",
            model=model,
        )
    ]
    if fast == "bf16":
        rows += [
            make_row(
                "step",
                "overhead, bf16 + channels_last",
                rates["ours fast"],
                rates["notebook fast"],
                "plain PyTorch loop, bf16 autocast + channels_last",
                "img/s",
                model=model,
            ),
            make_row(
                "step",
                "fast defaults (bf16 + channels_last)",
                rates["ours fast"],
                rates["notebook fp32"],
                "plain PyTorch loop, fp32 NCHW (the notebooks)",
                "img/s",
                model=model,
            ),
        ]
    rows.append(augment_threads_row())
    say(rows)
    if args.compile:
        rows += compile_rows(
            args, setups["ours fast" if fast == "bf16" else "ours fp32"], images, labels, mean, std, model
        )
    return rows


def compile_rows(args, eager: StepSetup, images, labels, mean, std, model: str) -> list[dict]:
    """torch.compile'd train step vs the same step eager; the compile time is reported beside it."""
    compiled = StepSetup(eager.precision, eager.channels_last, compile=True)
    timers = {
        "eager": our_step_timer(args, eager, images, labels, mean, std),
        "compiled": our_step_timer(args, compiled, images, labels, mean, std),
    }
    start = time.perf_counter()
    try:
        timers["compiled"](1)  # the first call compiles forward and backward
        compile_seconds = time.perf_counter() - start
        timers["compiled"](args.warmup)
    except Exception as exc:  # compile failures come in many types; report them, do not hide them
        first_line = str(exc).splitlines()[0][:300]
        message = f"torch.compile failed after {time.perf_counter() - start:.0f} s: {type(exc).__name__}: {first_line}"
        console.print(f"[yellow]{message}[/]")
        return [{"suite": "step", "case": "torch.compile", "failed": message}]
    timers["eager"](args.warmup)
    rates = interleaved({name: functools.partial(t, args.batches) for name, t in timers.items()}, args.repeats)
    rows = [
        make_row(
            "step",
            f"torch.compile ({'bf16 + channels_last' if eager.precision == 'bf16' else 'fp32'})",
            rates["compiled"],
            rates["eager"],
            "our step, eager",
            "img/s",
            model=model,
            compile_seconds=round(compile_seconds, 1),
        )
    ]
    say(rows)
    return rows


def augment_threads_row(batch: int = 256, size: int = 32, repeats: int = 5, calls: int = 20) -> dict:
    """BatchAugment.train (pad 4 + crop + flip + normalise) on the CPU with 1 intra-op thread, the trainer's
    setting, vs torch's default of one per core: the cost of thread oversubscription per batch."""
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    cpu = torch.device("cpu")

    def timer(threads: int) -> Callable[[], float]:
        augment = BatchAugment([0.5] * 3, [0.25] * 3, cpu, 4, True, cpu_threads=threads)
        generator = torch.Generator().manual_seed(0)

        def run() -> float:
            start = time.perf_counter()
            for _ in range(calls):
                augment.train(images, generator)
            return batch * calls / (time.perf_counter() - start)

        return run

    rates = interleaved({"one": timer(1), "default": timer(0)}, repeats)
    return make_row(
        "step",
        f"batch augmentation on the CPU, {batch} x {size}x{size}x3, 1 intra-op thread",
        rates["one"],
        rates["default"],
        f"the same with torch's default {torch.get_num_threads()} intra-op threads",
        "img/s",
        ms_per_batch={"one": round(batch * 1e3 / rates["one"], 2), "default": round(batch * 1e3 / rates["default"], 2)},
    )
