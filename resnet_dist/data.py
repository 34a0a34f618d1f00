"""Streaming loader: exact, resumable sample ranges over WebDataset shards.

Every epoch the shards of a split are put in a seeded order and seen as one virtual stream of
samples, shuffled within fixed global blocks. Training: optimizer step s takes stream positions
[s*G, (s+1)*G) (G = batch x processes x accumulation), cut into micro-batches of `batch` positions;
rank r at accumulation micro-step a takes micro-batch a*processes + r of the step (`micro_batch`). So
the samples of a step depend only on (seed, epoch, G), not on how G is split into processes, loader
workers and accumulation, and a run can resume on another split of the same G. Evaluation: each
process takes a contiguous slice of the split in file order, each loader worker a batch-aligned part
of it. The per-shard counts in index.json say where a position lies, so a resumed run starts at its
step's position directly instead of reading and dropping the samples before it.

Batches leave the workers as uint8 NHWC tensors of one size (4x fewer bytes than float32). Images
of one size are decoded as they are and padded, cropped and flipped on the training device
(resnet_dist.augment); images of any size are cropped to a fixed size in the workers
(resnet_dist.crops: RandomResizedCrop, or resize + centre crop), or with --decode gpu sent as JPEG
bytes for the training process to decode and crop (resnet_dist.gpu_decode). Normalisation always
happens on the training device.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import math
import multiprocessing
import os
import select
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import cycle, islice

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as decode_image_tv

from resnet_dist.autoaug import AugmentSpec, augment_image, sample_seeds
from resnet_dist.cache import CacheCounts, ShardCache, fetch_shard, shard_map
from resnet_dist.crops import CropSpec, Plan, batch_draws, decode_reduced, image_size, make_plan, reduction, resize_crop
from resnet_dist.errors import DataError
from resnet_dist.gpu_decode import encoded_batch
from resnet_dist.guard import ignore_stop_signals
from resnet_dist.index import DEFAULT_LABEL, DatasetIndex, ShardInfo, SplitInfo, class_ids, shards_at
from resnet_dist.integrity import checked_samples, intact_group, load_table
from resnet_dist.storage import is_remote
from resnet_dist.tars import IMAGE_EXTS, sample_label, tar_samples


@dataclass(frozen=True)
class Piece:
    """Read `take` samples of `shard`, after skipping its first `skip` samples."""

    shard: ShardInfo
    skip: int
    take: int

    @property
    def file(self) -> str:
        return self.shard.file


@dataclass(frozen=True)
class Lost:
    """Stands in for a sample that could not be read, so every position of the stream is accounted for."""

    reason: str


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard order of one epoch: a permutation seeded by (seed, epoch), so every rank agrees on it."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards).tolist()


def pieces_for_range(split: SplitInfo, order: list[int], start: int, stop: int) -> list[Piece]:
    """Pieces of shards covering samples [start, stop) of the stream made by `order`."""
    pieces, offset = [], 0
    for i in order:
        shard = split.shards[i]
        lo, hi = max(start, offset), min(stop, offset + shard.num_samples)
        if lo < hi:
            pieces.append(Piece(shard, lo - offset, hi - lo))
        offset += shard.num_samples
        if offset >= stop:
            break
    return pieces


def train_steps_per_epoch(num_samples: int, batch_size: int, world_size: int, grad_accum: int) -> int:
    """Micro-batches per rank per epoch: equal on every rank, a whole number of optimizer steps."""
    return num_samples // (batch_size * world_size * grad_accum) * grad_accum


def micro_batch(k: int, rank: int, world_size: int) -> int:
    """Which micro-batch of the epoch's global stream a rank's k-th micro-batch is (its positions are
    [m*batch, (m+1)*batch)). Step s, micro-step a (k = s*accum + a) of rank r takes micro-batch
    a*world + r of the step, s*world*accum + a*world + r in the epoch, which is k*world + r: so
    2 processes x 1 micro-step and 1 process x 2 micro-steps make the same micro-batches."""
    return k * world_size + rank


def block_order(seed: int, epoch: int, block: int, size: int) -> np.ndarray:
    """The shuffle of global block `block` (`size` positions): position i of the block holds the block's
    order[i]-th sample in shard order. Seeded by (seed, epoch, block) only, so every rank and worker agrees."""
    return np.random.default_rng([seed, epoch, block, 0xB10C]).permutation(size)


def worker_batches(num_batches: int, worker: int, num_workers: int) -> range:
    """Which of a rank's batches a worker makes: every num_workers-th, the DataLoader's round-robin order."""
    return range(worker, num_batches, num_workers)


# --- decoding -------------------------------------------------------------------------------------
# torchvision.io (libpng, libjpeg-turbo) decodes straight to a uint8 tensor, skipping PIL's Image
# objects: per core, with the tar reader, 2.1x at 64 px JPEG and 1.4x at 28 px PNG, where the safety
# check below costs a third of the decode (docs/performance.md, section 1). It is
# used only where its pixels equal PIL's convert("L"/"RGB") exactly (tests/test_tar_reader.py checks
# each PNG mode and JPEG); everything else (16-bit or interlaced PNG, other formats, anything
# torchvision refuses) goes through PIL as before, so results and error messages are unchanged.

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG color type -> samples per pixel


def png_is_sound(data: bytes) -> bool:
    """Whether libpng will read this 8-bit, non-interlaced PNG to the end without an error.

    torchvision 0.29's decode_png kills the process (SIGSEGV, reproduced here) when libpng meets damage
    in the pixel data, where PIL raises. So damage is looked for first: every chunk's CRC, a complete
    zlib stream of the right length, a valid filter byte on every row. About a third of a 28x28 PNG's
    decode time (docs/performance.md).
    """
    if len(data) < 33 or data[12:16] != b"IHDR" or data[24] > 8 or data[28] or data[25] not in PNG_SAMPLES:
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    row = (width * PNG_SAMPLES[data[25]] * data[24] + 7) // 8 + 1  # +1: the row's filter byte
    view, pos, idat = memoryview(data), 8, []
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data) or zlib.crc32(view[pos + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            return False
        kind = data[pos + 4 : pos + 8]
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            idat.append(view[pos + 8 : end])
        pos = end + 4
    else:
        return False
    inflate = zlib.decompressobj()
    try:
        pixels = inflate.decompress(b"".join(idat))
    except zlib.error:
        return False
    return inflate.eof and len(pixels) == row * height > 0 and max(pixels[::row]) <= 4


def decode_fast(data: bytes, channels: int) -> np.ndarray | None:
    """uint8 HxWxC with torchvision where that equals PIL's result; None where PIL must decide."""
    png = data[:8] == PNG_MAGIC
    if not (png and png_is_sound(data) or data[:2] == b"\xff\xd8"):
        return None
    gray = png and data[25] in (0, 4)  # gray, gray + alpha: the gray plane is PIL's "L" as it is
    mode = ImageReadMode.GRAY if channels == 1 and gray else ImageReadMode.RGB
    try:
        image = decode_image_tv(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except RuntimeError:
        return None
    if image.dtype != torch.uint8 or image.shape[0] != (1 if mode == ImageReadMode.GRAY else 3):
        return None
    array = image.numpy().transpose(1, 2, 0)
    if channels == 1 and not gray:  # PIL's RGB -> L: ITU-R 601-2 luma with its integer rounding
        wide = array.astype(np.uint32)
        array = ((wide[..., :1] * 19595 + wide[..., 1:2] * 38470 + wide[..., 2:] * 7471 + 0x8000) >> 16).astype(
            np.uint8
        )
    return array


def decode_image(data: bytes, channels: int, size: tuple[int, int] | None, where: str) -> np.ndarray:
    """Encoded image -> uint8 HxWxC in the dataset's channel count; `size` (h, w): the size it must have."""
    array = decode_fast(data, channels)
    if array is None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                array = np.asarray(img, dtype=np.uint8)
        except Exception as exc:  # PIL raises many types for damaged data
            raise DataError(f"{where}: image does not decode ({exc})") from exc
        if array.ndim == 2:
            array = array[:, :, None]
    if size is not None and array.shape[:2] != tuple(size):
        raise DataError(f"{where}: image is {array.shape[1]}x{array.shape[0]}, index says {size[1]}x{size[0]}")
    return array


def sample_parts(sample: dict, rule: dict = DEFAULT_LABEL, ids: dict[str, int] | None = None) -> tuple[bytes, int, str]:
    """(encoded image, label, where) of a sample read from a shard; the label by index.json's `label`
    rule (`ids`: class name -> id, index.class_ids). Without `ids`, a cls label is not range-checked."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or rule["member"] not in sample:
        raise DataError(f"{where}: sample lacks an image or a {rule['member']} entry (has {sorted(sample)})")
    if ids is None and rule == DEFAULT_LABEL:
        return sample[ext], int(sample["cls"]), where
    try:
        return sample[ext], sample_label(sample, rule, ids or {}), where
    except ValueError as exc:  # a foreign shard's unreadable label: this sample is lost, not the run
        raise DataError(f"{where}: {exc}") from None


def decode_sample(
    sample: dict, channels: int, size: tuple[int, int], rule: dict = DEFAULT_LABEL, ids: dict[str, int] | None = None
) -> tuple[np.ndarray, int]:
    data, label, where = sample_parts(sample, rule, ids)
    return decode_image(data, channels, size, where), label


def crop_image(data: bytes, channels: int, size: tuple[int, int], plan: Plan, res: int, where: str) -> np.ndarray:
    """An encoded image of header size `size` through its crop plan: uint8 res x res x C, decoded at
    reduced size where the plan allows it (a JPEG whose box holds 2x, 4x or 8x the pixels it keeps)."""
    s = reduction(plan) if data[:2] == b"\xff\xd8" else 1
    if s > 1:
        array, s = decode_reduced(data, channels, s, where)
    else:
        array = decode_image(data, channels, None, where)
    if array.shape[:2] != (-(-size[0] // s), -(-size[1] // s)):
        raise DataError(
            f"{where}: image decodes to {array.shape[1]}x{array.shape[0]}, its header says {size[1]}x{size[0]}"
        )
    image = torch.from_numpy(np.require(array, requirements="W")).permute(2, 0, 1)
    # One transposing copy to interleaved HWC here (torch's kernel, ~0.1 ms at 224 px): numpy's strided
    # copy into the batch would take ~0.6 ms for the same planar-to-interleaved move.
    return resize_crop(image, plan, res, s).permute(1, 2, 0).contiguous().numpy()


@dataclass(frozen=True)
class Encoded:
    """A sample left encoded for the device to decode (--decode gpu), with the crop it must get."""

    data: bytes
    plan: Plan
    where: str


def shard_problem(data: bytes, shard: ShardInfo) -> str | None:
    """Whether the bytes are the shard index.json describes (size, then sha256: computed as it streams)."""
    if len(data) != shard.bytes:
        return f"{shard.file}: {len(data)} bytes, index.json says {shard.bytes}"
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        return f"{shard.file}: sha256 differs from index.json (the shard changed since it was written)"
    return None


def read_piece(
    base: str, piece: Piece, strict: bool, tables: str | None = None, cache: ShardCache | None = None
) -> list[dict | Lost]:
    """Exactly `piece.take` items: the samples, or Lost markers for samples that cannot be trusted.

    The whole shard is fetched and checked against its size and sha256 before any sample is used. A
    shard that changed is not what index.json describes: with its per-sample table (beside index.json,
    at `tables`, default `base`) each sample is checked against its own digest and only the changed
    ones are lost (strict: an error naming the first); without one, all of them are.
    Remote shards come through `cache` (resnet_dist.cache), local ones are read in place.
    """
    samples: list[dict | Lost] = []
    try:
        data = fetch_shard(base, piece.shard, cache)
        problem = shard_problem(data, piece.shard)
        if problem and piece.shard.samples is not None:
            return salvage(tables or base, piece, data, problem, strict)
        if problem:
            raise DataError(problem)
        try:
            samples = list(tar_samples(data, piece))
        except ValueError as exc:  # tar_members' damaged header or cut member, tar_samples' repeated name
            raise DataError(f"{piece.file}: damaged tar ({exc})") from exc
        if len(samples) < piece.take:
            raise DataError(
                f"{piece.file}: damaged tar: {piece.skip + len(samples)} readable samples, "
                f"index.json promises {piece.skip + piece.take}"
            )
    except DataError as exc:
        if strict:
            raise
        samples += [Lost(f"{exc}; its unread samples are skipped")] * (piece.take - len(samples))
    return samples


def salvage(tables: str, piece: Piece, data: bytes, problem: str, strict: bool) -> list[dict | Lost]:
    """The piece of a changed shard, sample by sample: the intact ones, Lost for those whose own bytes changed."""
    try:
        table = load_table(tables, piece.shard)
    except DataError as exc:
        raise DataError(f"{problem}; {exc}") from None
    out: list[dict | Lost] = []
    for item in checked_samples(data, table, piece.file, piece.skip, piece.take):
        if isinstance(item, str) and strict:
            raise DataError(f"{item} ({problem})")
        out.append(Lost(item) if isinstance(item, str) else item)
    return out


def shuffled_positions(
    raw: Iterator[dict | Lost], positions: Iterator[int], first: int, block: int, total: int, seed: list[int]
) -> Iterator[dict | Lost]:
    """The samples at ascending stream `positions`, the stream shuffled within fixed blocks of `block`
    positions (block j: [j*block, (j+1)*block), the last one shorter, `total` in all).

    `raw` is the stream in shard order from position `first` (a block start) on, read once: a block is
    taken from it when a position first needs it and dropped once no later position can, so a worker
    holds at most the blocks its current micro-batch spans. Fixed blocks, each with its own seed, make
    the order of a position independent of where reading started: a resume starts at its block.
    """
    blocks: dict[int, list] = {}
    loaded = first // block
    for p in positions:
        j = p // block
        while loaded <= j:
            size = min(block, total - loaded * block)
            got = list(islice(raw, size))
            blocks[loaded] = [got[i] for i in block_order(*seed, loaded, size)]
            loaded += 1
        for old in [b for b in blocks if b < j]:
            del blocks[old]
        yield blocks[j][p - j * block]


def collate(items: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC images (one copy each into a preallocated batch) and int64 labels."""
    images = torch.empty((len(items), *items[0][0].shape), dtype=torch.uint8)
    out = images.numpy()
    for i, (image, _) in enumerate(items):
        out[i] = image
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return images, labels


class ShardStream(IterableDataset):
    """One rank's batches of one split for one epoch: (uint8 NHWC images, int64 labels, lost, problems, fetched).

    `lost` counts the batch's samples that could not be read (a damaged or changed shard, an image that
    does not decode), `problems` says why, once per cause. strict=True raises instead. `fetched` is the
    CacheCounts of the shard reads this worker made since its previous batch (remote data through
    `cache`: hits, downloads, bytes), so the trainer can sum what every worker of every rank did.

    train=True: seeded shard order, global block shuffle, exactly `num_batches` full batches on every
    rank: the micro-batches `micro_batch` gives this rank, of the epoch's whole optimizer steps (the
    tail that does not fill a global batch is left for other epochs' orders).
    train=False: the split in file order, ranks take contiguous near-equal slices, the last batch may be
    short: every sample is seen exactly once across all ranks.

    crop=None: images are decoded at their own size, which must be the index's one size. A CropSpec:
    each image is decoded and cropped to spec.res (resnet_dist.crops), its random draws seeded by
    (seed, epoch, global micro-batch), so a resumed run, on any split of the global batch, crops exactly
    alike; decode="gpu" leaves
    the cropping to the training process (resnet_dist.gpu_decode) and sends the JPEG bytes.
    """

    def __init__(
        self,
        base: str,
        index: DatasetIndex,
        split: str,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        train: bool,
        seed: int = 0,
        grad_accum: int = 1,
        shuffle_block: int = 2048,
        strict: bool = False,
        crop: CropSpec | None = None,
        decode: str = "cpu",
        cache: ShardCache | None = None,
        augment: AugmentSpec | None = None,
    ):
        if crop is None and index.image_size is None:
            raise DataError(f"{base}: its images vary in size; they need a crop (a CropSpec) to make batches")
        self.base, self.index, self.split_name, self.strict = base, index, split, strict
        self.crop, self.decode, self.cache = crop, decode, cache
        self.augment = augment if train else None  # evaluation is never augmented
        self.split = index.splits[split]
        # Foreign shards indexed elsewhere: the tars are at index.shard_base, index.json (and sidecars) at base.
        self.tar_base, self.ids = shards_at(base, index), class_ids(index)
        self.batch_size, self.rank, self.world_size, self.train = batch_size, rank, world_size, train
        self.seed, self.shuffle_block = seed, shuffle_block
        if train:
            self.num_batches = train_steps_per_epoch(self.split.num_samples, batch_size, world_size, grad_accum)
        else:
            n = self.split.num_samples
            self.rank_start, self.rank_stop = rank * n // world_size, (rank + 1) * n // world_size
            self.num_batches = math.ceil((self.rank_stop - self.rank_start) / batch_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0, res: int | None = None) -> None:
        """Next iteration yields this epoch's batches from batch `start_batch` on (mid-epoch resume),
        cropped to `res` px if given (progressive resizing)."""
        self.epoch, self.start_batch = epoch, start_batch
        if res is not None and self.crop is not None:
            self.crop = replace(self.crop, res=res)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of the images in a batch."""
        size = (self.crop.res, self.crop.res) if self.crop else tuple(self.index.image_size)
        return (*size, self.index.channels)

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def _worker(self) -> tuple[int, int]:
        """(logical worker, workers). The DataLoader asks worker 0 first; after a resume at batch k the
        next batch belongs to logical worker k % workers, so roles rotate by k."""
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.start_batch) % info.num_workers, info.num_workers

    def __iter__(self) -> Iterator[tuple]:
        worker, num_workers = self._worker()
        mine = worker_batches(self.num_batches, worker, num_workers)
        done = len(worker_batches(self.start_batch, worker, num_workers))
        order = epoch_shard_order(len(self.split.shards), self.seed, self.epoch, self.train)
        if self.train:
            micro = [micro_batch(k, self.rank, self.world_size) for k in mine[done:]]
            yield from self._batches(self._train_samples(order, micro), iter(micro))
            return
        # This worker's samples: a contiguous run of the rank's slice, its batches in order.
        first = sum(len(worker_batches(self.num_batches, w, num_workers)) for w in range(worker))
        begin = self.rank_start + first * self.batch_size
        end = min(begin + len(mine) * self.batch_size, self.rank_stop)
        samples = self._read(order, begin + done * self.batch_size, end)
        yield from self._batches(samples, iter(mine[done:]))

    def _train_samples(self, order: list[int], micro: list[int]) -> Iterator[dict | Lost]:
        """The samples of global micro-batches `micro` (ascending), position by position. The stream is read
        once, from the first block they touch to the last: each shard it needs is fetched once."""
        if not micro:
            return
        b, block, total = self.batch_size, self.shuffle_block, self.split.num_samples
        first = micro[0] * b // block * block
        stop = min(((micro[-1] + 1) * b - 1) // block * block + block, total)
        positions = (p for m in micro for p in range(m * b, (m + 1) * b))
        if not self._seekable():
            raw = self._read(order, first, stop)
            yield from shuffled_positions(raw, positions, first, block, total, [self.seed, self.epoch])
            return
        # Shuffle stream positions, not samples, and read only the samples at the positions this worker takes.
        reader = SeekReader(self, order)
        for q in shuffled_positions(iter(range(first, stop)), positions, first, block, total, [self.seed, self.epoch]):
            yield reader.sample(q)

    def _seekable(self) -> bool:
        """Whether single samples can be read where they lie: some shard has a per-sample table, and the
        bytes are in a local file (local data, or remote data through the shard cache; not --no-cache)."""
        local = not is_remote(self.tar_base) or (self.cache is not None and self.cache.root is not None)
        return local and any(shard.samples is not None for shard in self.split.shards)

    def _read(self, order: list[int], start: int, stop: int) -> Iterator[dict | Lost]:
        for piece in pieces_for_range(self.split, order, start, stop):
            # The tars may live elsewhere (shard_base); their per-sample tables are beside index.json.
            yield from read_piece(self.tar_base, piece, self.strict, tables=self.base, cache=self.cache)

    def _decode(self, sample: dict | Lost, u: np.ndarray | None) -> tuple[np.ndarray | Encoded, int] | Lost:
        if isinstance(sample, Lost):
            return sample
        try:
            if self.crop is None:
                size = tuple(self.index.image_size)
                return decode_sample(sample, self.index.channels, size, self.index.label, self.ids)
            data, label, where = sample_parts(sample, self.index.label, self.ids)
            size = image_size(data, where)
            plan = make_plan(*size, self.crop, u)
            if self.decode == "gpu":
                if data[:2] != b"\xff\xd8":
                    raise DataError(f"{where}: not a JPEG; --decode gpu decodes JPEG shards only")
                return Encoded(data, plan, where), label
            return crop_image(data, self.index.channels, size, plan, self.crop.res, where), label
        except DataError as exc:
            if self.strict:
                raise
            return Lost(f"{exc}; sample skipped")

    def _draws(self, batch: int) -> np.ndarray | list[None]:
        """The batch's crop uniforms: for random crops in training only (evaluation crops the centre)."""
        if self.crop is None or not self.train:
            return [None] * self.batch_size
        return batch_draws(self.seed, self.epoch, batch, self.batch_size)

    def _augment(self, item: tuple | Lost, seed: int | None) -> tuple | Lost:
        """A decoded (and cropped) train sample through --augment, seeded by its place in the run."""
        if seed is None or isinstance(item, Lost) or isinstance(item[0], Encoded):
            return item
        return augment_image(item[0], self.augment, seed), item[1]

    def _chunk(self, samples: Iterator[dict | Lost], numbers: Iterator[int]) -> list:
        """The next batch_size positions of the stream, decoded (Lost where they cannot be), and augmented."""
        taken = list(islice(samples, self.batch_size))
        if not taken:
            return []
        batch = next(numbers)
        seeds = sample_seeds(self.seed, self.epoch, batch, self.batch_size) if self.augment else [None] * len(taken)
        return [self._augment(self._decode(s, u), a) for s, u, a in zip(taken, self._draws(batch), seeds)]

    def _counts(self) -> CacheCounts:
        return CacheCounts(*self.cache.counts.as_tuple()) if self.cache else CacheCounts()

    def _batches(self, samples: Iterator[dict | Lost], numbers: Iterator[int]) -> Iterator[tuple]:
        """Every batch_size stream positions make one batch, whatever was lost, so batch counts stay exact."""
        previous: list = []
        counted = self._counts()
        while chunk := self._chunk(samples, numbers):
            counts = self._counts()
            fetched, counted = counts - counted, counts
            good = [item for item in chunk if not isinstance(item, Lost)]
            problems = sorted({item.reason for item in chunk if isinstance(item, Lost)})
            lost = len(chunk) - len(good)
            if lost and self.train:
                # Train batches stay full (DDP and BatchNorm want equal, non-empty batches): lost places are
                # filled with this batch's readable samples, or with the previous batch if none is readable.
                pool = good or previous
                if not pool:
                    raise DataError(f"{self.split_name}: no readable sample to train on ({problems[0]})")
                good = good + list(islice(cycle(pool), self.batch_size - len(good)))
            previous = good or previous
            if good and isinstance(good[0][0], Encoded):
                yield (*encoded_batch(good, self.crop.res, self.index.channels), lost, problems, fetched)
            elif good:
                yield (*collate(good), lost, problems, fetched)
            elif lost:  # an eval batch with nothing readable: report it with an empty batch
                yield (
                    torch.empty(0, *self.shape, dtype=torch.uint8),
                    torch.empty(0, dtype=torch.int64),
                    lost,
                    problems,
                    fetched,
                )


class SeekReader:
    """One epoch's train stream by position, each sample read from its own byte range.

    Training takes, in each worker, micro-batches spread over the whole stream (ShardStream), so reading
    whole shards would make every worker fetch, hash and walk every shard of the epoch to use a fraction
    of it. Here a shard with a per-sample table, whose bytes are in a local file of index.json's size
    (cache.shard_map), is mapped once, and each wanted sample's byte range is checked against its digest
    and parsed alone: the digests are this path's integrity check, in place of the whole-file sha256. A
    shard without a table or a local file, or the first time one of its samples fails its digest, is read
    whole through read_piece, which checks its sha256 and salvages sample by sample, as before: the same
    samples, the same Lost reasons, --strict-data the same errors.
    """

    def __init__(self, stream: ShardStream, order: list[int]):
        self.stream = stream
        self.shards = [stream.split.shards[i] for i in order]
        self.starts = np.cumsum([0] + [shard.num_samples for shard in self.shards]).tolist()
        # Place in `order` -> (map, table) or the whole shard's items; a shard goes once the positions,
        # ascending by block, have moved past it, so a worker holds only the shards of its current block.
        self.open: dict[int, tuple | list] = {}

    def sample(self, q: int) -> dict | Lost:
        """The item at stream position q (in shard order, before the block shuffle)."""
        low = q // self.stream.shuffle_block * self.stream.shuffle_block
        for j in [j for j in self.open if self.starts[j + 1] <= low]:
            del self.open[j]
        i = bisect.bisect_right(self.starts, q) - 1
        if i not in self.open:
            self.open[i] = self._open(self.shards[i])
        state, k = self.open[i], q - self.starts[i]
        if isinstance(state, list):
            return state[k]
        mapped, table = state
        group = intact_group(mapped, table, k)
        if group is None:  # the shard changed since it was packed: judge it whole, as read_piece always did
            self.open[i] = self._whole(self.shards[i])
            return self.open[i][k]
        return {"__key__": group.key, "__url__": self.shards[i].file, **group.payloads(mapped)}

    def _open(self, shard: ShardInfo) -> tuple | list:
        if shard.samples is None:
            return self._whole(shard)
        s = self.stream
        try:
            mapped = shard_map(s.tar_base, shard, s.cache)
        except DataError as exc:  # the download failed (after its retries): its samples are lost, as in read_piece
            if s.strict:
                raise
            return [Lost(f"{exc}; its unread samples are skipped")] * shard.num_samples
        if mapped is None:
            return self._whole(shard)
        try:
            return mapped, load_table(s.base, shard)
        except DataError:  # a missing or foreign table: the whole-shard read judges the shard by its sha256
            return self._whole(shard)

    def _whole(self, shard: ShardInfo) -> list[dict | Lost]:
        s = self.stream
        return read_piece(s.tar_base, Piece(shard, 0, shard.num_samples), s.strict, tables=s.base, cache=s.cache)


def start_worker(_worker_id: int, trainer_pid: int) -> None:
    """DataLoader worker_init_fn: ignore Ctrl-C (guard.ignore_stop_signals), and leave when the trainer dies.

    torch's own watchdog in a worker watches the worker's parent, which under a forkserver is the server,
    not the trainer; and the server stays up while any worker holds its liveness pipe. A trainer killed
    with SIGKILL (or leaving through os._exit) would leave both behind forever, holding its stdout and
    stderr open. So each worker watches the trainer's pid itself."""
    ignore_stop_signals()
    threading.Thread(target=_exit_with, args=(trainer_pid,), name="trainer-watchdog", daemon=True).start()


def _exit_with(pid: int) -> None:
    """Return never; end this process once `pid` has exited. A pidfd turns readable when the process
    exits, also while it lingers as a zombie its parent has not reaped yet (a test waiting on our
    stdout, say); `os.kill(pid, 0)` would still find a zombie alive."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+): poll, and read the state where /proc has it
        while _alive(pid):
            time.sleep(1.0)
        os._exit(0)
    select.select([fd], [], [])
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid was reused by another user's process
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return True


def worker_context() -> multiprocessing.context.BaseContext:
    """Where loader workers come from: a forkserver, not a fork of the training process.

    The training process runs Python threads (rich's refresh, W&B, pin-memory); forking it each epoch
    once deadlocked a worker inside the fork (PyOS_AfterFork_Child waiting on a lock a thread held), and
    the run then waited forever on it. A forkserver forks from a clean single-threaded process with
    torch and this module already imported, so each epoch's workers still start in milliseconds; the
    server itself starts once per process (a few seconds)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["resnet_dist.data"])
    return context


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over a ShardStream: batches are made in the workers, so batch_size=None here.

    Workers are re-created each epoch (not persistent) so they pick up set_epoch().
    """
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        worker_init_fn=functools.partial(start_worker, trainer_pid=os.getpid()) if num_workers else None,
        multiprocessing_context=worker_context() if num_workers else None,
    )
