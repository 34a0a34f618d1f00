"""Crops of images of any size: RandomResizedCrop's law, torchvision's eval pixels, reduced-size decoding,
the resolution schedule, and ShardStream making fixed-size batches from variable-size shards."""

from __future__ import annotations

import hashlib
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.io import decode_jpeg

from resnet_dist.bench.photos import photo_jpegs, photographs
from resnet_dist.crops import (
    DRAWS,
    CropSpec,
    Plan,
    batch_draws,
    center_plan,
    decode_reduced,
    image_size,
    jpeg_size,
    parse_res_schedule,
    reduction,
    resize_crop,
    rrc_box,
    rrc_plan,
)
from resnet_dist.data import ShardStream, crop_image, decode_image, make_loader
from resnet_dist.errors import DataError
from resnet_dist.gpu_decode import EncodedBatch, decode_batch
from resnet_dist.index import DatasetIndex, ShardInfo, SplitInfo

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(
        np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)))
    )


def ks_critical(n: int, m: int, alpha: float = 1e-3) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def box_stats(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T.astype(float)
    return {
        "area": h * w / (height * width),
        "log_aspect": np.log(w / h),
        "top": top / height,
        "left": left / width,
        "whole": (h == height) & (w == width),
    }


def ours(height: int, width: int, n: int, scale=SCALE, seed: int = 0) -> np.ndarray:
    u = np.random.default_rng(seed).random((n, 10, 4))
    return np.array([rrc_box(height, width, u[i], scale, RATIO) for i in range(n)])


def torchvisions(height: int, width: int, n: int, seed: int = 0) -> np.ndarray:
    torch.manual_seed(seed)
    image = torch.empty(1, height, width)
    return np.array([T.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(n)])


@pytest.mark.parametrize("height,width", [(375, 500), (333, 500), (64, 64), (40, 300)])
def test_rrc_draws_follow_torchvisions_get_params_law(height, width):
    """Area fraction, aspect, position and the centre fallback's frequency: the same distributions."""
    n = 4000
    a, b = box_stats(ours(height, width, n), height, width), box_stats(torchvisions(height, width, n), height, width)
    limit = ks_critical(n, n)
    for key in ("area", "log_aspect", "top", "left"):
        assert ks_distance(a[key], b[key]) < limit, key
    assert abs(a["whole"].mean() - b["whole"].mean()) < 4 * math.sqrt(0.25 / n) + 1e-9  # fallbacks, same rate


def test_the_law_comparison_can_fail():
    """A different scale range (0.2-1 instead of 0.08-1) is caught by the same test."""
    a = box_stats(ours(375, 500, 4000, scale=(0.2, 1.0)), 375, 500)
    b = box_stats(torchvisions(375, 500, 4000), 375, 500)
    assert ks_distance(a["area"], b["area"]) > ks_critical(4000, 4000)


@pytest.mark.parametrize("height,width", [(10, 1000), (1000, 10), (30, 35)])
def test_rrc_fallback_is_torchvisions_centre_crop(height, width):
    """When no try fits (areas too large for the shape), both take the same centre box."""
    u = np.full((10, 4), 0.999)  # the largest area: fits only if the aspect allows it
    mine = rrc_box(height, width, u, (0.99, 1.0), RATIO)
    torch.manual_seed(0)
    theirs = T.RandomResizedCrop.get_params(torch.empty(1, height, width), [0.99, 1.0], list(RATIO))
    if (height, width) != (30, 35):  # thin images: no box fits in any try, the fallback is deterministic
        assert mine == tuple(theirs)
    assert 0 <= mine[0] <= height - mine[2] and 0 <= mine[1] <= width - mine[3]


def jpeg(array: np.ndarray, quality: int = 90, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality, **kw)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return photographs()


def test_header_sizes_equal_pils(photos):
    photo = photos[1][:123, :457]
    for data in (jpeg(photo), jpeg(photo, progressive=True), jpeg(photo, exif=b"Exif\0\0" + b"\0" * 300)):
        assert jpeg_size(data) == (123, 457)
    png = io.BytesIO()
    Image.fromarray(photo).save(png, "PNG")
    assert image_size(png.getvalue(), "x") == (123, 457)
    assert jpeg_size(b"\xff\xd8\x00\x00") is None
    with pytest.raises(DataError, match="x: image does not decode"):
        image_size(b"\xff\xd8 not a jpeg at all", "x")


def eval_ours(data: bytes, res: int, crop_ratio: float = 0.875) -> tuple[np.ndarray, int]:
    size = image_size(data, "x")
    plan = center_plan(*size, CropSpec("center", res, crop_ratio=crop_ratio))
    return crop_image(data, 3, size, plan, res, "x"), reduction(plan)


def test_eval_crop_equals_torchvisions_resize_and_centre_crop(photos):
    """Resize(256) + CenterCrop(224) (PIL bilinear, antialiased): within 1 level, where no reduced decode
    applies; and the same output geometry (odd sizes, both orientations) everywhere."""
    reference = T.Compose([T.Resize(256), T.CenterCrop(224)])
    checked = 0
    for photo in photos:
        for h, w in [(photo.shape[0], photo.shape[1]), (301, 257), (257, 301), (241, 433)]:
            data = jpeg(photo[:h, :w])
            got, s = eval_ours(data, 224)
            want = np.asarray(reference(Image.open(io.BytesIO(data)).convert("RGB")))
            assert got.shape == want.shape == (224, 224, 3)
            if s == 1:
                assert np.abs(got.astype(int) - want).max() <= 1
                checked += 1
    assert checked >= 20


def test_reduced_decode_equals_the_full_decode_within_resampling_tolerance(photos):
    """Decoding at 1/2, 1/4, 1/8 and mapping the box: within the difference between two standard
    antialiased resamplers (mean abs <= 6 levels each, <= 3 on average, PSNR >= 30 dB)."""
    errors, scales = [], set()
    for photo in photos:
        data = jpeg(photo)
        size = image_size(data, "x")
        full = torch.from_numpy(decode_image(data, 3, None, "x")).permute(2, 0, 1)
        for res in (224, 128, 64, 32):
            plan = center_plan(*size, CropSpec("center", res))
            s = reduction(plan)
            if s == 1:
                continue
            scales.add(s)
            got = crop_image(data, 3, size, plan, res, "x").astype(float)
            want = resize_crop(full, plan, res, 1).permute(1, 2, 0).numpy().astype(float)
            error = np.abs(got - want).mean()
            assert error <= 6 and 10 * np.log10(255**2 / np.mean((got - want) ** 2)) >= 30, (size, res, s)
            errors.append(error)
    assert scales == {2, 4, 8} and np.mean(errors) <= 3


def test_rrc_crop_through_a_reduced_decode_matches_the_full_decode(photos):
    """Random boxes large enough for DCT scaling: the same tolerance as the eval crop; the box left in
    full-size coordinates on the reduced image (the mapping skipped) fails it."""
    data = jpeg(photos[6])  # 1411 x 1411
    size = image_size(data, "x")
    full = torch.from_numpy(decode_image(data, 3, None, "x")).permute(2, 0, 1)
    u = batch_draws(0, 0, 0, 64)
    spec = CropSpec("rrc", 96, flip=True)
    unmapped = []
    for row in u:
        plan = rrc_plan(*size, spec, row)
        got = crop_image(data, 3, size, plan, 96, "x").astype(float)
        want = resize_crop(full, plan, 96, 1).permute(1, 2, 0).numpy().astype(float)
        assert np.abs(got - want).mean() <= 6
        if reduction(plan) > 1:
            small, s = decode_reduced(data, 3, reduction(plan), "x")
            wrong = resize_crop(torch.from_numpy(small.copy()).permute(2, 0, 1), plan, 96, 1).permute(1, 2, 0)
            unmapped.append(np.abs(wrong.numpy().astype(float) - want).mean())
    assert len(unmapped) > 32 and np.median(unmapped) > 6


def test_float_resampling_for_the_gpu_equals_uint8_within_one_level(photos):
    image = torch.from_numpy(photos[0].copy()).permute(2, 0, 1)
    for plan in (Plan(10, 20, 300, 400, 160, 160, 0, 0, True), Plan(0, 0, 512, 512, 146, 146, 9, 9, False)):
        a = resize_crop(image, plan, 128, float_math=False).int()
        b = resize_crop(image, plan, 128, float_math=True).int()
        assert a.shape == b.shape == (3, 128, 128) and (a - b).abs().max() <= 1


def test_res_schedule_is_ffcvs_get_resolution():
    """FFCV's rn18 16-epoch config: min_res 160, max_res 192, start_ramp 11, end_ramp 13."""
    ffcv = parse_res_schedule("160:192:11-13")
    assert [ffcv.at(e, 16) for e in range(16)] == [160] * 12 + [192] * 4
    linear = parse_res_schedule("128:256")  # from epoch 0 to the last epoch
    assert [linear.at(e, 9) for e in range(9)] == [
        128,
        128,
        160,
        192,
        192,
        192,
        224,
        256,
        256,
    ]  # np.round: halves to even
    assert parse_res_schedule("160:192:4").at(4, 10) == 192
    for bad in ("160", "160:190", "160:192:x", "160:192:5-3", "0:192"):
        with pytest.raises(ValueError):
            parse_res_schedule(bad)


# --- ShardStream over variable-size shards --------------------------------------------------------


def write_shards(folder: Path, images: list[tuple[bytes, int]], per_shard: int) -> DatasetIndex:
    """Variable-size JPEGs in webdataset tars, and the index that describes them (image_size None)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, start in enumerate(range(0, len(images), per_shard)):
        path = folder / f"train-{n:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, (data, label) in enumerate(images[start : start + per_shard], start):
                for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        raw = path.read_bytes()
        shards.append(
            ShardInfo(path.name, len(images[start : start + per_shard]), hashlib.sha256(raw).hexdigest(), len(raw))
        )
    classes = [str(c) for c in range(max(label for _, label in images) + 1)]
    split = SplitInfo(len(images), tuple(shards))
    return DatasetIndex("test", classes, None, 3, "jpeg", [0.5] * 3, [0.25] * 3, {"train": split, "val": split})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, DatasetIndex, list[tuple[bytes, int]]]:
    images = photo_jpegs(75, seed=3, sides=(40, 160))
    folder = tmp_path_factory.mktemp("varsize")
    return folder, write_shards(folder, images, 16), images


def stream(shards, train: bool, crop: CropSpec, **kw) -> ShardStream:
    folder, index, _ = shards
    return ShardStream(
        str(folder),
        index,
        "train" if train else "val",
        batch_size=8,
        rank=kw.pop("rank", 0),
        world_size=kw.pop("world", 1),
        train=train,
        seed=4,
        crop=crop,
        shuffle_block=20,
        **kw,
    )


def batches(s: ShardStream, workers: int, epoch: int = 1, start: int = 0, res: int | None = None) -> list:
    s.set_epoch(epoch, start, res)
    return list(make_loader(s, workers, pin_memory=False))


def test_variable_sizes_make_fixed_size_batches_seeded_by_their_place_in_the_run(shards):
    rrc = CropSpec("rrc", 48, flip=True)
    one = batches(stream(shards, True, rrc), 2)
    assert len(one) == 75 // 8 and all(b[0].shape == (8, 48, 48, 3) and b[0].dtype == torch.uint8 for b in one)
    again = batches(stream(shards, True, rrc), 2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, again))
    other_epoch = batches(stream(shards, True, rrc), 2, epoch=2)
    assert not torch.equal(one[0][0], other_epoch[0][0])
    assert batches(stream(shards, True, rrc), 0, res=64)[0][0].shape == (8, 64, 64, 3)  # a schedule's next res


def test_mid_epoch_resume_crops_exactly_as_the_uninterrupted_epoch(shards):
    rrc = CropSpec("rrc", 40, flip=True)
    full = batches(stream(shards, True, rrc, rank=1, world=2), 2, epoch=3)
    for start in (1, 2):
        rest = batches(stream(shards, True, rrc, rank=1, world=2), 2, epoch=3, start=start)
        assert len(rest) == len(full) - start
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, full[start:]))


def test_eval_sees_every_image_once_centre_cropped(shards):
    _, _, images = shards
    spec = CropSpec("center", 56)
    two_workers = [b for r in range(3) for b in batches(stream(shards, False, spec, rank=r, world=3), 2)]
    assert sorted(torch.cat([b[1] for b in two_workers]).tolist()) == sorted(y for _, y in images)
    got = [b for r in range(3) for b in batches(stream(shards, False, spec, rank=r, world=3), 0)]  # file order
    pixels = torch.cat([b[0] for b in got])
    assert pixels.shape == (75, 56, 56, 3) and torch.cat([b[1] for b in got]).tolist() == [y for _, y in images]
    for i in (0, 40, 74):
        assert np.array_equal(pixels[i].numpy(), eval_ours(images[i][0], 56)[0])


def test_gpu_decode_path_on_the_cpu_gives_the_workers_crops(shards):
    """Workers send bytes and plans; decoding them as a batch (the CPU decoder standing in for nvJPEG)
    and cropping gives the same pixels as cropping in the workers, where no reduced decode applies."""
    rrc = CropSpec("rrc", 32, flip=True)
    cpu = batches(stream(shards, True, rrc), 2)
    gpu = batches(stream(shards, True, rrc, decode="gpu"), 2)
    assert isinstance(gpu[0][0], EncodedBatch) and len(gpu) == len(cpu)
    same = 0
    for (images, labels, *_), (encoded, labels2, *_) in zip(cpu, gpu):
        out, out_labels, lost, _ = decode_batch(encoded, labels2, torch.device("cpu"), train=True, decode=decode_jpeg)
        assert out.shape == images.shape and torch.equal(out_labels, labels) and lost == 0
        for i, plan in enumerate(encoded.plans):
            if reduction(plan) == 1:
                assert torch.equal(out[i], images[i])
                same += 1
            else:
                # 40-160 px images cut to 32 px: a reduced decode differs more than on photographs at 224 px.
                # The worst image over the stream's draws of seeds 0-7 was 4.2-10.1 levels (4.8-9.4 with the
                # draws seeded by rank before issue 12): the former bound of 6 held for seed 4's draws only.
                assert (out[i].float() - images[i].float()).abs().mean() <= 12
    assert same > 20


def test_gpu_decode_loses_only_the_image_that_does_not_decode(shards):
    (encoded, labels, *_), *_ = batches(stream(shards, False, CropSpec("center", 32), decode="gpu"), 0)
    encoded.payloads[3] = encoded.payloads[3][:200]  # cut short: the header reads, the pixels do not
    out, out_labels, lost, problems = decode_batch(
        encoded, labels, torch.device("cpu"), train=False, decode=decode_jpeg
    )
    assert lost == 1 and out.shape[0] == 7 and out_labels.tolist() == labels[[0, 1, 2, 4, 5, 6, 7]].tolist()
    assert "image does not decode on the GPU" in problems[0]
    full, _, lost, _ = decode_batch(encoded, labels, torch.device("cpu"), train=True, decode=decode_jpeg)
    assert lost == 1 and full.shape[0] == 8  # train batches stay full


def test_draws_depend_on_the_batch_not_the_worker():
    assert np.array_equal(batch_draws(1, 2, 4, 8), batch_draws(1, 2, 4, 8))
    assert batch_draws(1, 2, 4, 8).shape == (8, DRAWS)
    assert not np.array_equal(batch_draws(1, 2, 4, 8), batch_draws(1, 2, 5, 8))
