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


def test_round_trip_through_json():
    index = make_index(extra_labels={"coarse": ["x", "y"]})
    obj = json.loads(json.dumps(index.to_json()))
    assert obj["num_classes"] == 3 and obj["format_version"] == 1
    assert obj["image_size"] == [28, 24]  # height, width
    assert parse_index(obj, "test") == index


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
    "bad format": (_set(["format"], "webp"), "format must be one of"),
    "bad sha": (_set(["splits", "test", "shards", 0, "sha256"], "xyz"), "sha256"),
    "no splits": (_set(["splits"], {}), "no splits"),
    "no shards": (_set(["splits", "test", "shards"], []), "no shards"),
    "num_classes disagrees": (_set(["num_classes"], 4), "num_classes is 4"),
    "version": (_set(["format_version"], 2), "format_version 2"),
    "duplicate shard": (_set(["splits", "test", "shards", 0, "file"], "train-000000.tar"), "listed twice"),
    "negative std": (_set(["std"], [-0.1]), "std must be > 0"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_parse_index_rejects_with_one_line_naming_where(case):
    mutate, expected = BROKEN[case]
    with pytest.raises(DataError) as err:
        parse_index(_broken(mutate), "shards/x/index.json")
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
