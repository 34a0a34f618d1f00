"""index.json: the contract both halves parse. Every malformed index fails with one line naming where."""

from __future__ import annotations

import copy
import json
import os

import pytest

from resnet_dist.errors import DataError
from resnet_dist.index import (
    DatasetIndex,
    ShardInfo,
    SplitInfo,
    load_index,
    parse_index,
    write_index,
)

SHA = "ab" * 32


def make_index(**overrides) -> DatasetIndex:
    fields = dict(
        source="fashion-mnist",
        classes=["a", "b", "c"],
        image_size=(28, 24),
        channels=1,
        format="png",
        mean=[0.286],
        std=[0.353],
        splits={
            "train": SplitInfo(
                7, (ShardInfo("train-000000.tar", 5, SHA, 10240), ShardInfo("train-000001.tar", 2, SHA, 10240))
            ),
            "test": SplitInfo(3, (ShardInfo("test-000000.tar", 3, SHA, 10240),)),
        },
        extra_labels={},
        skipped=[{"path": "train/x.jpg", "reason": "cannot decode"}],
        notes=["a note"],
        args={"seed": 0},
        created="2026-01-01T00:00:00Z",
        tool="resnet-dist 0.1.0",
    )
    fields.update(overrides)
    return DatasetIndex(**fields)


def point(side: int) -> dict:
    return {"min": side, "median": side, "max": side}


FIXED_SIZES = {"height": point(28), "width": point(24), "shorter_side": point(24), "longer_side": point(28)}
VARIED_SIZES = {
    "height": {"min": 40, "median": 300, "max": 500},
    "width": {"min": 60, "median": 350, "max": 600},
    "shorter_side": {"min": 40, "median": 290, "max": 320},
    "longer_side": {"min": 60, "median": 360, "max": 600},
}


def variable_index(**overrides) -> DatasetIndex:
    fields = dict(
        image_size=None,
        channels=3,
        mean=[0.48, 0.45, 0.40],
        std=[0.23, 0.22, 0.22],
        sizes=VARIED_SIZES,
        max_size=320,
        conversions={"cmyk_jpeg": 2, "resized": 40},
        stats_sample={"images": 5, "of": 7, "seed": 3},
    )
    fields.update(overrides)
    return make_index(**fields)


def test_round_trip_through_json():
    index = make_index(
        extra_labels={"coarse": ["x", "y"]}, sizes=FIXED_SIZES, stats_sample={"images": 7, "of": 7, "seed": 0}
    )
    obj = json.loads(json.dumps(index.to_json()))
    assert obj["num_classes"] == 3 and obj["format_version"] == 3
    assert obj["image_size"] == [28, 24]  # height, width
    assert obj["sizes"]["shorter_side"] == point(24) and obj["max_size"] is None and obj["conversions"] == {}
    assert parse_index(obj, "test") == index


def test_variable_sizes_round_trip():
    index = variable_index()
    obj = json.loads(json.dumps(index.to_json()))
    assert obj["image_size"] is None and obj["max_size"] == 320
    assert obj["stats_sample"] == {"images": 5, "of": 7, "seed": 3}
    assert parse_index(obj, "test") == index


def test_format_version_1_still_reads():
    """An index written before sizes could vary: no sizes, max_size, conversions or stats_sample."""
    obj = make_index().to_json()
    for key in ("sizes", "max_size", "conversions", "stats_sample"):
        del obj[key]
    obj["format_version"] = 1
    index = parse_index(obj, "old")
    assert index.format_version == 1 and index.image_size == (28, 24)
    assert index.sizes is None and index.max_size is None and index.conversions == {} and index.stats_sample is None
    obj["image_size"] = None  # only format 2 may leave sizes open
    with pytest.raises(DataError, match="old: field 'image_size' must be list, got NoneType"):
        parse_index(obj, "old")


def test_extra_labels_only_present_when_used():
    assert "extra_labels" not in make_index().to_json()


def _broken(mutate):
    obj = make_index().to_json()
    mutate(obj)
    return obj


def _set(path, value):
    def mutate(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


BROKEN = {
    "count mismatch": (_set(["splits", "train", "num_samples"], 8), "shards hold 7"),
    "zero samples": (_set(["splits", "test", "num_samples"], 0), "must be > 0"),
    "zero shard samples": (_set(["splits", "test", "shards", 0, "num_samples"], 0), "must be > 0"),
    "channels 2": (_set(["channels"], 2), "channels must be 1 or 3"),
    "mean length": (_set(["mean"], [0.1, 0.2, 0.3]), "mean and std must have 1"),
    "std length": (_set(["std"], []), "mean and std must have 1"),
    "slash in file": (_set(["splits", "test", "shards", 0, "file"], "sub/test-000000.tar"), "plain file name"),
    "dotdot in file": (_set(["splits", "test", "shards", 0, "file"], "..test.tar"), "plain file name"),
    "missing classes": (lambda o: o.pop("classes"), "missing field 'classes'"),
    "classes not strings": (_set(["classes"], [1, 2]), "list of strings"),
    "size wrong type": (_set(["image_size"], "28x28"), "image_size"),
    "size three values": (_set(["image_size"], [28, 28, 1]), "image_size"),
    "bool count": (_set(["splits", "test", "num_samples"], True), "must be int"),
    "bad format": (_set(["format"], "gif"), "format must be one of"),
    "bad sha": (_set(["splits", "test", "shards", 0, "sha256"], "xyz"), "sha256"),
    "no splits": (_set(["splits"], {}), "no splits"),
    "no shards": (_set(["splits", "test", "shards"], []), "no shards"),
    "num_classes disagrees": (_set(["num_classes"], 4), "num_classes is 4"),
    "version": (_set(["format_version"], 4), "format_version 4 is not supported"),
    "duplicate shard": (_set(["splits", "test", "shards", 0, "file"], "train-000000.tar"), "listed twice"),
    "negative std": (_set(["std"], [-0.1]), "std must be > 0"),
}


# Broken variable-size (format 2) indexes: the fields sizes can vary by.
BROKEN_V2 = {
    "sizes missing a side": (lambda o: o["sizes"].pop("longer_side"), "sizes must have exactly"),
    "sizes min above max": (_set(["sizes", "height", "min"], 900), "sizes.height must be {min, median, max}"),
    "sizes median not int": (_set(["sizes", "width", "median"], 3.5), "sizes.width must be"),
    "sizes zero": (_set(["sizes", "shorter_side", "min"], 0), "0 < min <= median <= max"),
    "sizes not an object": (_set(["sizes"], [1, 2]), "field 'sizes' must be dict or NoneType"),
    "fixed size but sizes vary": (_set(["image_size"], [300, 350]), "sizes.height spans 40..500 but image_size"),
    "null size, sizes all one": (
        _set(["sizes"], {"height": point(5), "width": point(6), "shorter_side": point(5), "longer_side": point(6)}),
        "image_size is null but sizes say every image is the same size",
    ),
    "max_size zero": (_set(["max_size"], 0), "max_size must be > 0 or null"),
    "max_size text": (_set(["max_size"], "320"), "field 'max_size' must be int or NoneType"),
    "shorter side above max_size": (_set(["max_size"], 300), "sizes.shorter_side.max 320 exceeds max_size 300"),
    "conversion count zero": (_set(["conversions", "cmyk_jpeg"], 0), "conversions must map each kind to a count > 0"),
    "conversion count text": (_set(["conversions", "resized"], "40"), "conversions must map"),
    "stats sample above total": (_set(["stats_sample", "images"], 8), "0 < images <= of"),
    "stats sample no seed": (lambda o: o["stats_sample"].pop("seed"), "stats_sample must be {images, of, seed}"),
    "stats sample empty": (_set(["stats_sample", "images"], 0), "0 < images <= of"),
}


def _broken_v2(mutate):
    obj = variable_index().to_json()
    mutate(obj)
    return obj


@pytest.mark.parametrize("case", sorted(BROKEN) + sorted(BROKEN_V2))
def test_parse_index_rejects_with_one_line_naming_where(case):
    mutate, expected = BROKEN.get(case) or BROKEN_V2[case]
    obj = _broken(mutate) if case in BROKEN else _broken_v2(mutate)
    with pytest.raises(DataError) as err:
        parse_index(obj, "shards/x/index.json")
    message = str(err.value)
    assert message.startswith("shards/x/index.json")
    assert expected in message
    assert "\n" not in message


def test_parse_index_rejects_non_object():
    with pytest.raises(DataError, match="where: index must be a JSON object"):
        parse_index([1, 2], "where")


def test_load_index_missing_folder(tmp_path):
    with pytest.raises(DataError, match="index.json not found"):
        load_index(tmp_path / "nowhere")


def test_load_index_not_json(tmp_path):
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_index(tmp_path)


def test_load_index_not_utf8(tmp_path):
    (tmp_path / "index.json").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(DataError, match="cannot read"):
        load_index(tmp_path)


def test_write_then_load(tmp_path):
    index = make_index()
    path = write_index(tmp_path, index)
    assert load_index(tmp_path) == index
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]  # no temporary left behind


def test_write_index_is_atomic_when_interrupted(tmp_path, monkeypatch):
    old = make_index()
    write_index(tmp_path, old)

    def interrupted(*args):
        raise KeyboardInterrupt

    # A Ctrl-C between writing the temporary and renaming it: the old index stays whole.
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_index(tmp_path, make_index(classes=["other", "x", "y"]))
    monkeypatch.undo()
    assert load_index(tmp_path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_index_in_docs_parses():
    """The example in docs/shard-format.md has the fields parse_index requires (placeholders aside)."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "shard-format.md").read_text()
    block = text.split("```json", 1)[1].split("```", 1)[0]
    obj = json.loads(block)
    obj = copy.deepcopy(obj)
    for split in obj["splits"].values():
        split["shards"] = [s for s in split["shards"] if isinstance(s, dict)] or [
            {"file": "test-000000.tar", "num_samples": split["num_samples"], "sha256": SHA, "bytes": 1}
        ]
        for s in split["shards"]:
            s["sha256"] = SHA
        split["num_samples"] = sum(s["num_samples"] for s in split["shards"])
    obj["classes"] = [f"c{i}" for i in range(obj["num_classes"])]
    index = parse_index(obj, "docs")
    assert index.channels == 1 and index.image_size == (28, 28)
