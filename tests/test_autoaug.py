"""--augment: torchvision's TrivialAugmentWide/RandAugment per sample in the workers, seeded by the sample's place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_crops import write_shards
from torchvision.transforms import v2

from resnet_dist.autoaug import AugmentSpec, augment_image, sample_seeds
from resnet_dist.bench.photos import photo_jpegs
from resnet_dist.crops import CropSpec
from resnet_dist.data import ShardStream, make_loader, micro_batch
from resnet_dist.storage import read_index

SPECS = [
    (AugmentSpec("trivialaugment"), v2.TrivialAugmentWide),
    (AugmentSpec("randaugment", 3, 14), lambda: v2.RandAugment(num_ops=3, magnitude=14)),
]


@pytest.mark.parametrize("spec,torchvision", SPECS)
@pytest.mark.parametrize("shape", [(28, 28, 1), (40, 32, 3)])
def test_each_image_is_torchvisions_transform_under_its_seed(spec, torchvision, shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    outputs = []
    for seed in sample_seeds(1, 2, 3, 12):
        torch.manual_seed(seed)
        expected = torchvision()(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0)
        got = augment_image(image, spec, seed)
        assert got.dtype == np.uint8 and got.shape == shape
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(got)), expected)
        outputs.append(got)
    assert sum(not np.array_equal(o, image) for o in outputs) >= 6  # it does augment, and differently per seed


def test_the_callers_random_state_is_left_alone():
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    augment_image(np.zeros((8, 8, 3), np.uint8), AugmentSpec("trivialaugment"), 123)
    assert torch.equal(torch.rand(3), before)


def test_seeds_depend_on_the_batchs_place_only():
    assert sample_seeds(0, 1, 5, 8) == sample_seeds(0, 1, 5, 8)
    assert len({*sample_seeds(0, 1, 5, 8), *sample_seeds(0, 1, 6, 8), *sample_seeds(0, 2, 5, 8)}) == 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple:
    folder = tmp_path_factory.mktemp("autoaug")
    return folder, write_shards(folder, photo_jpegs(32, seed=5, sides=(40, 90)), 12)


def stream(shards, train: bool, augment: AugmentSpec | None, **kw) -> ShardStream:
    folder, index = shards
    crop = CropSpec("rrc", 32, flip=True) if train else CropSpec("center", 32)
    split = "train" if train else "val"
    return ShardStream(
        str(folder), index, split, batch_size=8, rank=kw.pop("rank", 0), world_size=kw.pop("world", 1),
        train=train, seed=4, crop=crop, shuffle_block=16, augment=augment, **kw,
    )  # fmt: skip


def batches(s: ShardStream, workers: int, epoch: int = 1, start: int = 0) -> list:
    s.set_epoch(epoch, start)
    return list(make_loader(s, workers, pin_memory=False))


def test_workers_augment_each_cropped_train_image_by_its_place_and_never_eval(shards):
    spec = AugmentSpec("trivialaugment")
    plain = batches(stream(shards, True, None, rank=1, world=2), 0)
    augmented = batches(stream(shards, True, spec, rank=1, world=2), 2)
    assert len(plain) == len(augmented) == 2
    for k, (a, b) in enumerate(zip(plain, augmented)):
        assert torch.equal(a[1], b[1])
        seeds = sample_seeds(4, 1, micro_batch(k, 1, 2), 8)  # rank 1's k-th micro-batch of 2 ranks
        expected = [augment_image(image.numpy(), spec, s) for image, s in zip(a[0], seeds)]  # after the crop
        assert torch.equal(b[0], torch.from_numpy(np.stack(expected)))
    # a resumed epoch (another worker count) augments its remaining batch exactly alike
    rest = batches(stream(shards, True, spec, rank=1, world=2), 1, start=1)
    assert torch.equal(rest[0][0], augmented[1][0])
    # evaluation is never augmented, whatever the stream is given
    assert all(
        torch.equal(a[0], b[0])
        for a, b in zip(batches(stream(shards, False, None), 0), batches(stream(shards, False, spec), 0))
    )


def test_fixed_size_images_are_augmented_as_decoded(synthetic_shards):
    """--train-crop pad: the workers decode the image as it is and augment it; the device crops after."""
    index = read_index(str(synthetic_shards))
    spec = AugmentSpec("randaugment", 2, 9)

    def make(augment):
        return ShardStream(str(synthetic_shards), index, "train", batch_size=16, rank=0, world_size=1, train=True,
                           seed=3, augment=augment)  # fmt: skip

    a, b = batches(make(None), 0, epoch=0)[:2], batches(make(spec), 1, epoch=0)[:2]
    for k, (plain, augmented) in enumerate(zip(a, b)):
        expected = [augment_image(image.numpy(), spec, s) for image, s in zip(plain[0], sample_seeds(3, 0, k, 16))]
        assert torch.equal(augmented[0], torch.from_numpy(np.stack(expected)))
        assert not torch.equal(augmented[0], plain[0])
