"""Per-sample auto-augmentation of train images in the loader workers: torchvision's own transforms.

--augment trivialaugment|randaugment runs torchvision.transforms.v2's TrivialAugmentWide or RandAugment
(their defaults; RandAugment's num_ops and magnitude from --randaugment-n/-m) on each uint8 image, with
torch's CPU generator seeded per sample from (seed, epoch, global micro-batch, place in the batch), as
the crop draws are seeded (crops.batch_draws). So the law is torchvision's by construction, every sample
can be reproduced alone (`torch.manual_seed(s); TrivialAugmentWide()(image)`), and a resumed run, on
any split of the global batch into processes, workers and accumulation, augments the same images alike.

The workers already touch every image (decode, crop); the ops are per-image affine warps, colour and
histogram ops that torchvision has no batched form of. Measured cost: docs/performance.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2

SEED_TAG = 0xA06A  # keeps these seeds apart from the crop draws' and the shuffle's, which share (seed, epoch)


@dataclass(frozen=True)
class AugmentSpec:
    """--augment NAME (trivialaugment or randaugment), --randaugment-n, --randaugment-m."""

    name: str
    num_ops: int = 2
    magnitude: int = 9


def augment_spec(cfg) -> AugmentSpec | None:
    """The train stream's auto-augmentation from the config (None: --augment none)."""
    if cfg.augment == "none":
        return None
    return AugmentSpec(cfg.augment, cfg.randaugment_n, cfg.randaugment_m)


@functools.lru_cache(maxsize=4)
def transform(spec: AugmentSpec) -> v2.Transform:
    """torchvision's transform for a spec, with its defaults (nearest interpolation, fill 0)."""
    if spec.name == "trivialaugment":
        return v2.TrivialAugmentWide()
    if spec.name == "randaugment":
        return v2.RandAugment(num_ops=spec.num_ops, magnitude=spec.magnitude)
    raise ValueError(f"unknown augmentation {spec.name!r}")


def sample_seeds(seed: int, epoch: int, batch: int, n: int) -> list[int]:
    """The torch seeds of one batch's n samples: a function of where the batch is in the run only
    (`batch`: the global micro-batch, data.micro_batch), like crops.batch_draws."""
    return np.random.default_rng([seed, epoch, batch, SEED_TAG]).integers(0, 2**63, n).tolist()


def augment_image(image: np.ndarray, spec: AugmentSpec, seed: int) -> np.ndarray:
    """A uint8 H x W x C image through the spec's transform, drawn from torch's CPU generator seeded
    with `seed`; the generator's state is put back after (a process that loads batches itself, with
    --num-workers 0, keeps its own draws). Seeding the default generator directly, not through
    torch.manual_seed, which also visits every accelerator backend: 1 us instead of 66 here."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        chw = torch.from_numpy(np.require(image, requirements="W")).permute(2, 0, 1)
        out = transform(spec)(chw)
    finally:
        generator.set_state(state)
    return out.permute(1, 2, 0).numpy()
