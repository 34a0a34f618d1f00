import torch
import torchvision.transforms.v2.functional as TF

from resnet_dist.augment import BatchAugment, crop_flip, normalize


def reference(images, padding, generator_seed):
    """What crop_flip must equal: per-sample pad, crop at the drawn offset, flip, via torchvision."""
    n = images.shape[0]
    g = torch.Generator().manual_seed(generator_seed)
    shift = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=g)
    mirrored = torch.rand(n, 1, generator=g) < 0.5
    out = []
    for i in range(n):
        chw = images[i].permute(2, 0, 1)
        padded = TF.pad(chw, [padding], fill=0)
        crop = TF.crop(padded, int(shift[0, i]), int(shift[1, i]), chw.shape[1], chw.shape[2])
        out.append((TF.horizontal_flip(crop) if mirrored[i] else crop).permute(1, 2, 0))
    return torch.stack(out)


def test_crop_flip_equals_torchvision_per_sample_transforms():
    images = torch.randint(0, 256, (32, 12, 10, 3), dtype=torch.uint8)
    got = crop_flip(images, 4, True, torch.Generator().manual_seed(7))
    assert got.dtype == torch.uint8 and got.shape == images.shape
    assert torch.equal(got, reference(images, 4, 7))


def test_crop_flip_draws_differ_per_sample_and_cover_every_offset():
    images = torch.arange(64, dtype=torch.uint8).view(1, 8, 8, 1).repeat(2000, 1, 1, 1)
    out = crop_flip(images, 2, False, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) == 25  # (2*2+1)^2 offsets all drawn
    assert torch.equal(crop_flip(images[:3], 0, False), images[:3])


def test_normalize_matches_formula_and_is_channels_last():
    images = torch.randint(0, 256, (4, 6, 5, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.3, 0.4])
    x = normalize(images, mean, std, channels_last=True)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert x.shape == (4, 3, 6, 5)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert normalize(images, mean, std, channels_last=False).is_contiguous()


def test_batch_augment_eval_is_deterministic_and_train_is_not():
    aug = BatchAugment([0.5], [0.25], torch.device("cpu"), padding=4, flip=True)
    images = torch.randint(0, 256, (16, 28, 28, 1), dtype=torch.uint8)
    assert torch.equal(aug.eval(images), aug.eval(images))
    a = aug.train(images, torch.Generator().manual_seed(1))
    b = aug.train(images, torch.Generator().manual_seed(2))
    assert a.shape == (16, 1, 28, 28) and not torch.equal(a, b)
