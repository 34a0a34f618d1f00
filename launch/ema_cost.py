"""The cost of one --ema update against one train step, for width-16 and width-64 ResNet-18s.

    python launch/ema_cost.py --threads 1

Both are timed in this process on the same model (channels_last, as the trainer keeps it): the update
is resnet_dist.ema.ModelEma.step (parameters and BatchNorm buffers), the step a bf16-autocast forward,
backward and SGD step on a batch of 128 random 32x32 images. Prints one line per width; the numbers
for this machine are in docs/performance.md ("The cost of the weight EMA").
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from resnet_dist.ema import ModelEma
from resnet_dist.errors import OneLineParser, run_cli
from resnet_dist.models import build_model, count_parameters


def timed(fn, repeats: int, inner: int = 1) -> list[float]:
    """Seconds per call of `fn`, `repeats` times (each the mean of `inner` calls), after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return out


def measure(width: int, batch: int) -> str:
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=3, stem="cifar", width=width)
    model = model.to(memory_format=torch.channels_last)
    ema = ModelEma(model, 0.999)
    update = timed(lambda: ema.step(model), repeats=7, inner=20)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def train_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step = timed(train_step, repeats=3)
    u, s = statistics.median(update), statistics.median(step)
    return (
        f"width {width} ({count_parameters(model):,} parameters), {torch.get_num_threads()} thread(s): "
        f"EMA update {u * 1e3:.2f} ms (median of 7, min {min(update) * 1e3:.2f}), train step {s * 1e3:.0f} ms "
        f"(batch {batch}): the update is {u / s:.2%} of a step"
    )


def main(argv=None) -> int:
    parser = OneLineParser(prog="launch/ema_cost.py", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--batch-size", type=int, default=128, help="train step batch (default: 128)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for width in (16, 64):
        print(measure(width, args.batch_size), flush=True)
    print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    run_cli(main)
