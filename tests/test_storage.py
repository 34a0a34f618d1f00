"""Shards from a local folder or over HTTP (a real server on 127.0.0.1), and the up-front checks."""

import functools
import hashlib
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import read_json, train

from resnet_dist.data import ShardStream, make_loader
from resnet_dist.errors import DataError
from resnet_dist.storage import check_shards, read_index


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(synthetic_shards):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(synthetic_shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fingerprints(base, index, split, train):
    stream = ShardStream(base, index, split, batch_size=8, rank=0, world_size=1, train=train, seed=3)
    return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x, *_ in make_loader(stream, 1, False)]


def test_http_prefix_streams_the_same_batches_as_the_folder(served, synthetic_shards):
    index = read_index(served)
    assert index == read_index(str(synthetic_shards))
    for split, is_train in (("train", True), ("val", False)):
        assert fingerprints(served, index, split, is_train) == fingerprints(
            str(synthetic_shards), index, split, is_train
        )


def test_http_missing_index_is_one_clear_error(served):
    with pytest.raises(DataError, match=r"index.json: HTTP 404"):
        read_index(served + "/nowhere")


@pytest.mark.slow
def test_two_process_training_over_http(served, tmp_path):
    out = tmp_path / "r"
    result = train(
        "--data",
        served,
        "--out",
        str(out),
        "--epochs",
        "1",
        "--max-steps",
        "4",
        "--width",
        "8",
        "--batch-size",
        "16",
        "--num-workers",
        "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_json(out / "summary.json")["steps_done"] == 4


def test_missing_or_resized_local_shard_fails_before_training(synthetic_shards, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(synthetic_shards, copy)
    index = read_index(str(copy))
    check_shards(str(copy), index, ["train", "val"])
    victim = copy / index.splits["train"].shards[1].file
    with open(victim, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DataError, match="bytes, index.json says"):
        check_shards(str(copy), index, ["train"])
    victim.unlink()
    with pytest.raises(DataError, match="shard listed in index.json is missing"):
        check_shards(str(copy), index, ["train"])


def test_not_a_shard_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        read_index(str(tmp_path / "absent"))
    with pytest.raises(DataError, match="index.json"):
        read_index(str(tmp_path))


def test_damaged_shard_with_strict_data_is_one_line_naming_the_shard(synthetic_shards, tmp_path):
    """A data error raised in a loader worker ends the run with the worker's own message, not its traceback."""
    import subprocess
    import sys

    from helpers import ROOT, TRAIN, run_env

    copy = tmp_path / "ds"
    shutil.copytree(synthetic_shards, copy)
    first = copy / read_index(str(copy)).splits["train"].shards[0].file
    data = bytearray(first.read_bytes())
    data[600:640] = bytes(b ^ 0xFF for b in data[600:640])  # inside the first PNG, size unchanged
    first.write_bytes(bytes(data))
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "--data",
            str(copy),
            "--out",
            str(tmp_path / "r"),
            "--width",
            "8",
            "--batch-size",
            "16",
            "--num-workers",
            "1",
            "--wandb-mode",
            "disabled",
            "--strict-data",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=run_env(),
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    # One line naming the shard and its first damaged sample (its per-sample table says which).
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {first.name}: sample ") and "changed since it was packed" in line, line
    assert f"({first.name}: sha256 differs from index.json (the shard changed since it was written))" in line
