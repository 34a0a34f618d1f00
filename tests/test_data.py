"""The streaming loader on real shards made by the shard CLI: exact, equal, resumable."""

import hashlib
import json
import shutil
from collections import Counter

import pytest
import torch
from helpers import shard

import resnet_dist.data as data_module
from resnet_dist.data import ShardStream, epoch_shard_order, make_loader, micro_batch, pieces_for_range
from resnet_dist.errors import DataError
from resnet_dist.index import ShardInfo, SplitInfo
from resnet_dist.storage import read_index


def fingerprints(batches):
    """One hash per image: the synthetic images are distinct, so equal hashes mean the same sample."""
    return [hashlib.sha1(img.numpy().tobytes()).hexdigest() for images, *_ in batches for img in images]


def rank_batches(base, index, split, rank, world, workers, *, epoch=0, start=0, batch=16, train=True, **kw):
    stream = ShardStream(
        str(base), index, split, batch_size=batch, rank=rank, world_size=world, train=train, seed=5, **kw
    )
    stream.set_epoch(epoch, start)
    return list(make_loader(stream, workers, pin_memory=False)), stream


def test_pieces_cover_range_in_order():
    shards = (ShardInfo("a", 4, "", 1), ShardInfo("b", 3, "", 1), ShardInfo("c", 3, "", 1))
    split = SplitInfo(10, shards)
    got = [(p.file, p.skip, p.take) for p in pieces_for_range(split, [2, 0, 1], 2, 8)]
    assert got == [("c", 2, 1), ("a", 0, 4), ("b", 0, 1)]
    assert pieces_for_range(split, [0, 1, 2], 5, 5) == []


def test_shard_order_is_seeded_per_epoch_and_shared():
    assert epoch_shard_order(20, 1, 3, True) == epoch_shard_order(20, 1, 3, True)
    assert epoch_shard_order(20, 1, 3, True) != epoch_shard_order(20, 1, 4, True)
    assert epoch_shard_order(5, 1, 3, False) == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """A train split in ONE shard: fewer shards than processes x workers."""
    out = tmp_path_factory.mktemp("one") / "ds"
    result = shard(
        "synthetic",
        "--out",
        str(out),
        "--num-classes",
        "3",
        "--image-size",
        "8",
        "--num-samples",
        "203",
        "--shard-size",
        "1000",
        "--seed",
        "2",
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1), (2, 3)])
def test_equal_batches_per_rank_no_sample_twice(one_shard, world, workers):
    index = read_index(str(one_shard))
    assert len(index.splits["train"].shards) == 1
    per_rank = [rank_batches(one_shard, index, "train", r, world, workers)[0] for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert counts == {203 // (16 * world)}
    assert all(images.shape[0] == 16 and lost == 0 for b in per_rank for images, _, lost, *_ in b)
    seen = [fp for b in per_rank for fp in fingerprints(b)]
    assert len(seen) == len(set(seen)) == 203 // (16 * world) * 16 * world


def test_grad_accum_makes_whole_optimizer_steps(synthetic_shards):
    index = read_index(str(synthetic_shards))
    stream = ShardStream(
        str(synthetic_shards), index, "train", batch_size=16, rank=0, world_size=2, train=True, grad_accum=4
    )
    assert stream.num_batches == 540 // (16 * 2 * 4) * 4


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 1), (3, 2)])
def test_eval_counts_every_sample_exactly_once(uneven_shards, world, workers):
    index = read_index(str(uneven_shards))
    for split in ("val", "test"):
        n = index.splits[split].num_samples
        assert world == 1 or n % world  # a rank that dropped the leftover would go unseen otherwise
        seen = []
        for r in range(world):
            seen += fingerprints(rank_batches(uneven_shards, index, split, r, world, workers, train=False, batch=7)[0])
        assert (len(seen), len(set(seen))) == (n, n)  # every sample, none twice


@pytest.mark.parametrize("world", range(1, 9))
def test_eval_ranks_split_an_uneven_split_exactly_at_every_world_size(uneven_shards, world):
    """Each rank's stream read in this process (no loader workers): together, every sample once, and
    near-equal shares (the n % world leftover spread one sample at a time)."""
    index = read_index(str(uneven_shards))
    for split in ("val", "test"):
        n = index.splits[split].num_samples
        shares = []
        for r in range(world):
            stream = ShardStream(str(uneven_shards), index, split, batch_size=5, rank=r, world_size=world, train=False)
            shares.append(fingerprints(list(stream)))
        seen = [fp for share in shares for fp in share]
        assert (len(seen), len(set(seen))) == (n, n)  # every sample, none twice
        assert max(map(len, shares)) - min(map(len, shares)) == (1 if n % world else 0)


def test_labels_match_the_shards(synthetic_shards):
    index = read_index(str(synthetic_shards))
    batches, _ = rank_batches(synthetic_shards, index, "val", 0, 1, 0, train=False)
    labels = Counter(int(y) for _, ys, *_ in batches for y in ys)
    assert sum(labels.values()) == 60 and set(labels) == set(range(4))


def test_epochs_reshuffle(synthetic_shards):
    index = read_index(str(synthetic_shards))
    e0 = fingerprints(rank_batches(synthetic_shards, index, "train", 0, 1, 2, epoch=0)[0])
    e0_again = fingerprints(rank_batches(synthetic_shards, index, "train", 0, 1, 2, epoch=0)[0])
    e1 = fingerprints(rank_batches(synthetic_shards, index, "train", 0, 1, 2, epoch=1)[0])
    assert e0 == e0_again and e0 != e1


@pytest.mark.parametrize("workers,start", [(0, 5), (2, 5), (2, 6), (3, 13)])
def test_mid_epoch_resume_yields_exactly_the_remaining_batches(synthetic_shards, workers, start):
    index = read_index(str(synthetic_shards))
    full, _ = rank_batches(synthetic_shards, index, "train", 1, 2, workers, epoch=3, shuffle_block=40)
    rest, stream = rank_batches(synthetic_shards, index, "train", 1, 2, workers, epoch=3, start=start, shuffle_block=40)
    assert len(rest) == len(stream) == len(full) - start
    assert fingerprints(rest) == fingerprints(full[start:])
    assert all(a[1].tolist() == b[1].tolist() for a, b in zip(rest, full[start:]))


# Elastic determinism: a step's samples depend only on (seed, epoch, global batch) ---------------------------


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (1, 2), (3, 2), (2, 4)])
def test_every_micro_batch_of_every_step_is_taken_once_across_ranks_and_micro_steps(world, accum):
    steps = 5
    taken = Counter()
    for rank in range(world):
        for k in range(steps * accum):
            m = micro_batch(k, rank, world)
            assert m // (world * accum) == k // accum  # rank's k-th micro-batch belongs to its step k // accum
            taken[m] += 1
    assert taken == Counter(range(steps * world * accum))  # each exactly once, none outside the steps


def elastic_stream(base, index, world, accum, workers, start=0):
    """Micro-batches as the optimizer sees them: step by step, micro-step by micro-step, rank by rank."""
    per_rank = [
        rank_batches(
            base, index, "train", r, world, workers, start=start, batch=16, grad_accum=accum, shuffle_block=40
        )[0]
        for r in range(world)
    ]
    assert len({len(b) for b in per_rank}) == 1
    return [fingerprints([per_rank[r][k]]) for k in range(len(per_rank[0])) for r in range(world)]


def test_a_step_has_the_same_micro_batches_whatever_the_split_of_the_global_batch(synthetic_shards):
    """Global batch 64 as 2 ranks x 2 accumulation, 4 ranks, 1 rank x 4, 2 ranks x 2 with 3 workers: the
    same micro-batches in the same order (and their position = step * 64 + m * 16, so the same per step);
    over the epoch no sample twice, every whole global batch's worth of the stream taken."""
    index = read_index(str(synthetic_shards))
    ref = elastic_stream(synthetic_shards, index, 2, 2, 0)
    assert len(ref) == 540 // 64 * 4
    for world, accum, workers in [(4, 1, 2), (1, 4, 1), (2, 2, 3), (1, 4, 0)]:
        assert elastic_stream(synthetic_shards, index, world, accum, workers) == ref, (world, accum, workers)
    seen = [fp for batch in ref for fp in batch]
    assert len(seen) == len(set(seen)) == 540 // 64 * 64
    # resumed after 3 optimizer steps on another split: the same remaining micro-batches
    assert elastic_stream(synthetic_shards, index, 1, 4, 2, start=3 * 4) == ref[3 * 4 :]
    assert elastic_stream(synthetic_shards, index, 4, 1, 1, start=3) == ref[3 * 4 :]


# --- the train path reads single samples where they lie (per-sample tables) -------------------------


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    """640 train samples in 4 shards with per-sample tables: at a global batch of 32 every one is trained on."""
    out = tmp_path_factory.mktemp("seek") / "ds"
    args = ["--num-classes", "3", "--image-size", "8", "--num-samples", "640", "--shard-size", "160", "--seed", "4"]
    result = shard("synthetic", "--out", str(out), *args)
    assert result.returncode == 0, result.stderr
    return out


def epoch_batches(base, world, workers, **kw):
    """Every rank's batches of train epoch 1 (block 100: micro-batches straddle blocks and shards)."""
    index = read_index(str(base))
    kw = {"epoch": 1, "shuffle_block": 100, **kw}
    return [rank_batches(base, index, "train", r, world, workers, **kw)[0] for r in range(world)]


def whole_shard_reads(monkeypatch) -> list[str]:
    """The shards read whole (read_piece) from now on, in this process."""
    seen, real = [], data_module.read_piece

    def spy(base, piece, *args, **kw):
        seen.append(piece.file)
        return real(base, piece, *args, **kw)

    monkeypatch.setattr(data_module, "read_piece", spy)
    return seen


def same_batches(a, b) -> None:
    assert [len(r) for r in a] == [len(r) for r in b]
    for x, y in zip((x for r in a for x in r), (y for r in b for y in r)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2:4] == y[2:4]


@pytest.mark.parametrize("world,workers,start", [(1, 0, 0), (2, 0, 3)])
def test_seeking_samples_gives_the_whole_shard_reads_batches(four_shards, monkeypatch, world, workers, start):
    reads = whole_shard_reads(monkeypatch)
    seek = epoch_batches(four_shards, world, workers, start=start)
    assert reads == [] and index_format(four_shards) == 3  # no shard was read whole
    monkeypatch.setattr(ShardStream, "_seekable", lambda self: False)
    same_batches(seek, epoch_batches(four_shards, world, workers, start=start))
    assert reads  # the whole-shard path ran


def test_a_changed_sample_costs_only_itself_when_seeking(four_shards, tmp_path, monkeypatch):
    copy = tmp_path / "ds"
    shutil.copytree(four_shards, copy)
    index = read_index(str(copy))
    info = index.splits["train"].shards[2]
    table = json.loads((copy / info.samples).read_text())
    raw = bytearray((copy / info.file).read_bytes())
    for k in (7, 100):
        raw[table["offsets"][k] + 512 + 24] ^= 0x5A  # inside the image payload; the size stays
    (copy / info.file).write_bytes(bytes(raw))
    reads = whole_shard_reads(monkeypatch)
    seek = epoch_batches(copy, 2, 0)
    assert set(reads) == {info.file}  # only the changed shard was judged whole
    assert sum(lost for r in seek for _, _, lost, *_ in r) == 2  # each of the 640 samples is read once
    problems = {p for r in seek for *_, ps, _ in r for p in ps}
    assert {f"{info.file}: sample {table['keys'][k]}" for k in (7, 100)} == {p.split(" (from")[0] for p in problems}
    with pytest.raises(DataError, match=f"{info.file}: sample {table['keys'][7]} .*sha256 differs"):
        epoch_batches(copy, 1, 0, strict=True)  # --strict-data: as the whole-shard read always said
    monkeypatch.setattr(ShardStream, "_seekable", lambda self: False)
    same_batches(seek, epoch_batches(copy, 2, 0))


def index_format(base) -> int:
    return json.loads((base / "index.json").read_text())["format_version"]
