"""The local shard cache against a real HTTP server on 127.0.0.1 that logs every request (test_http_faults'
FaultServer): each shard downloaded once per machine, whatever the ranks, workers, epochs and runs;
racing processes; least-recently-used eviction; crashed downloads; damaged downloads not kept."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import ROOT, ok, read_json, run_env, train
from test_http_faults import FaultServer
from wandb_log import history, run_file
from wandb_log import summary as summary_of

from resnet_dist.cache import LAYOUT, ShardCache, _locked, evict, fetch_shard, make_cache
from resnet_dist.data import Piece, read_piece
from resnet_dist.errors import UsageError
from resnet_dist.evaluate import main as evaluate_main
from resnet_dist.storage import read_index

TINY = ["--width", "8", "--batch-size", "16", "--lr", "0.05", "--log-every", "5"]


@pytest.fixture
def http_env(monkeypatch):
    monkeypatch.setenv("RESNET_DIST_HTTP_TIMEOUT", "10")
    monkeypatch.setenv("RESNET_DIST_HTTP_BACKOFF", "0.01")
    # A proxy from the environment would sit between us and the loopback server.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(synthetic_shards, http_env):
    with FaultServer(synthetic_shards) as srv:
        yield srv


@pytest.fixture
def shards(synthetic_shards):
    index = read_index(str(synthetic_shards))
    return [s for split in index.splits.values() for s in split.shards]


def tar_gets(server) -> dict[str, int]:
    return {name: n for (method, name), n in server.seen.items() if method == "GET" and name.endswith(".tar")}


def entries(cache_dir: Path) -> set[str]:
    return {p.name for p in (cache_dir / LAYOUT).glob("*.tar")}


def test_local_data_is_read_in_place(synthetic_shards, tmp_path):
    assert make_cache(str(synthetic_shards), True, str(tmp_path / "c"), 0) is None
    assert not (tmp_path / "c").exists()


def test_an_unwritable_cache_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match=r"^--cache-dir .*file: cannot write there .*; or use --no-cache$"):
        make_cache("http://127.0.0.1:1/x", True, str(tmp_path / "file"), 0)


def test_default_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_DIST_CACHE", str(tmp_path / "env"))
    assert make_cache("https://h/x", True, "", 0).root == (tmp_path / "env").resolve()
    assert make_cache("https://h/x", True, str(tmp_path / "flag"), 0).root == (tmp_path / "flag").resolve()
    monkeypatch.delenv("RESNET_DIST_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert make_cache("https://h/x", True, "", 0).root == (tmp_path / "home" / ".cache" / "resnet-dist").resolve()


def test_one_download_then_hits_with_the_same_samples(server, synthetic_shards, shards, tmp_path):
    cache = make_cache(server.url, True, str(tmp_path / "c"), 0)
    shard = shards[0]
    piece = Piece(shard, skip=3, take=shard.num_samples - 3)
    first = read_piece(server.url, piece, strict=True, cache=cache)
    again = read_piece(server.url, piece, strict=True, cache=cache)
    assert first == again == read_piece(str(synthetic_shards), piece, strict=True)
    assert tar_gets(server) == {shard.file: 1}
    assert cache.counts.as_dict() == {"hits": 1, "downloads": 1, "bytes_downloaded": shard.bytes}
    assert entries(tmp_path / "c") == {f"{shard.sha256}.tar"}
    assert list((tmp_path / "c" / LAYOUT).glob("*.tmp*")) == []


def test_no_cache_downloads_every_time(server, shards, tmp_path):
    cache = make_cache(server.url, False, str(tmp_path / "c"), 0)
    for _ in range(2):
        fetch_shard(server.url, shards[0], cache)
    assert tar_gets(server) == {shards[0].file: 2}
    assert cache.counts.as_dict() == {"hits": 0, "downloads": 2, "bytes_downloaded": 2 * shards[0].bytes}
    assert not (tmp_path / "c").exists()


def test_a_changed_shard_is_returned_but_not_kept(synthetic_shards, shards, tmp_path, http_env):
    served = tmp_path / "served"
    shutil.copytree(synthetic_shards, served)
    raw = bytearray((served / shards[0].file).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (served / shards[0].file).write_bytes(bytes(raw))
    with FaultServer(served) as srv:
        cache = make_cache(srv.url, True, str(tmp_path / "c"), 0)
        assert fetch_shard(srv.url, shards[0], cache) == bytes(raw)  # the caller judges it (read_piece: Lost)
        assert fetch_shard(srv.url, shards[0], cache) == bytes(raw)
        assert tar_gets(srv) == {shards[0].file: 2}
    assert entries(tmp_path / "c") == set()


RACER = """
import json, sys
from resnet_dist.cache import make_cache, fetch_shard
from resnet_dist.index import ShardInfo
url, cache_dir, shard = sys.argv[1], sys.argv[2], ShardInfo(**json.loads(sys.argv[3]))
cache = make_cache(url, True, cache_dir, 0)
print(fetch_shard(url, shard, cache) == open(sys.argv[4], "rb").read(), json.dumps(cache.counts.as_dict()))
"""


def racer(server, shard, cache_dir: Path, local: Path, **env) -> subprocess.Popen:
    info = json.dumps({k: getattr(shard, k) for k in ("file", "num_samples", "sha256", "bytes")})
    cmd = [sys.executable, "-c", RACER, server.url, str(cache_dir), info, str(local / shard.file)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(cmd, **pipes, cwd=ROOT, env=run_env(**env))


def slow_server(server, seconds: float) -> None:
    """Every request waits first: the racers are all inside the download window together."""
    handle = server.handle
    server.handle = lambda h, head: (time.sleep(seconds), handle(h, head))


def test_processes_racing_for_one_shard_download_it_once(server, synthetic_shards, shards, tmp_path):
    slow_server(server, 1.0)
    procs = [racer(server, shards[0], tmp_path / "c", synthetic_shards) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    counts = [json.loads(out.split(" ", 1)[1]) for out, _ in results]
    assert all(out.startswith("True ") for out, _ in results), results
    assert tar_gets(server) == {shards[0].file: 1}
    assert sum(c["downloads"] for c in counts) == 1 and sum(c["hits"] for c in counts) == 3


def test_a_killed_download_leaves_no_entry_and_blocks_no_one(server, synthetic_shards, shards, tmp_path):
    server.plan(shards[0].file, ["stall"])  # the first GET hangs: the racer dies in the middle of it
    proc = racer(server, shards[0], tmp_path / "c", synthetic_shards, RESNET_DIST_HTTP_TIMEOUT="60")
    deadline = time.monotonic() + 60
    while not tar_gets(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tar_gets(server), proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert entries(tmp_path / "c") == set()
    # A crash between writing the temp file and renaming it leaves this behind: the next user deletes it.
    stale = tmp_path / "c" / LAYOUT / f"{shards[0].sha256}.tar.tmp.999999"
    stale.write_bytes(b"half a shard")
    cache = make_cache(server.url, True, str(tmp_path / "c"), 0)
    assert fetch_shard(server.url, shards[0], cache) == (synthetic_shards / shards[0].file).read_bytes()
    assert entries(tmp_path / "c") == {f"{shards[0].sha256}.tar"} and not stale.exists()


def test_least_recently_used_shards_are_evicted_beyond_the_limit(server, shards, tmp_path):
    a, b, c, d = shards[:4]
    limit = a.bytes + b.bytes + c.bytes // 2  # room for two of these shards, not three
    cache = ShardCache(make_cache(server.url, True, str(tmp_path / "c"), 0).root, limit)
    folder = tmp_path / "c" / LAYOUT
    for shard in (a, b):
        fetch_shard(server.url, shard, cache)
    now = time.time()
    os.utime(folder / f"{a.sha256}.tar", (now - 20, now - 20))  # a, then b: a is older
    os.utime(folder / f"{b.sha256}.tar", (now - 10, now - 10))
    fetch_shard(server.url, a, cache)  # a hit: a is now the most recently used
    fetch_shard(server.url, c, cache)  # over the limit: b, the least recently used, goes
    assert entries(tmp_path / "c") == {f"{a.sha256}.tar", f"{c.sha256}.tar"}
    assert sum(p.stat().st_size for p in folder.glob("*.tar")) <= limit
    assert not (folder / f"{b.sha256}.lock").exists()
    # An entry another process is reading is skipped, even when it is the oldest.
    os.utime(folder / f"{a.sha256}.tar", (now - 30, now - 30))
    with _locked(folder / f"{a.sha256}.lock", fcntl.LOCK_SH):
        fetch_shard(server.url, d, cache)
        assert entries(tmp_path / "c") == {f"{a.sha256}.tar", f"{d.sha256}.tar"}
    assert cache.counts.as_dict()["downloads"] == 4 and cache.counts.hits == 1
    assert evict(cache) == []  # a and d: under the limit now


@pytest.mark.slow
def test_a_two_process_run_downloads_each_shard_once_and_its_resume_nothing(server, shards, tmp_path):
    """2 ranks x 2 loader workers x 2 epochs, plus validation and the final test: one GET per shard. The
    run is cut one step short and resumed, as after a preemption: the resumed run downloads nothing."""
    args = ["--data", server.url, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    args += ["--epochs", "2", "--num-workers", "2", *TINY]
    steps = 2 * (540 // 32)
    first = ok(train(*args, "--max-steps", str(steps - 1)))
    gets = tar_gets(server)
    assert gets == {s.file: 1 for s in shards}, gets
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["steps_done"] == steps - 1
    cache = summary["cache"]
    assert cache["downloads"] == len(shards) and cache["bytes_downloaded"] == sum(s.bytes for s in shards)
    assert cache["hits"] >= len(shards)  # the second epoch alone reads every train shard again
    assert cache["dir"] == str((tmp_path / "cache").resolve())
    epochs = read_json(tmp_path / "run" / "history.json")
    assert sum(h["cache_downloads"] for h in epochs) == len(shards) - 2  # the test shards: read after epoch 2
    assert f"cache {epochs[0]['cache_hits']} hits, {epochs[0]['cache_downloads']} downloads" in first.stdout
    assert f"shard cache in {cache['dir']}: {cache['hits']} hits, {len(shards)} downloads" in first.stdout

    rows = history(run_file(tmp_path / "run"))
    assert sum(r.get("data/cache_downloads", 0) for r in rows) == len(shards) - 2
    assert summary_of(run_file(tmp_path / "run"))["cache/downloads"] == len(shards)

    resumed = ok(train(*args))
    assert "resumed from" in resumed.stdout
    assert tar_gets(server) == gets  # not one more GET
    again = read_json(tmp_path / "run" / "summary.json")
    assert again["steps_done"] == steps
    assert again["cache"]["downloads"] == 0 and again["cache"]["bytes_downloaded"] == 0
    assert again["cache"]["hits"] > 0
    assert entries(tmp_path / "cache") == {f"{s.sha256}.tar" for s in shards}

    # evaluate takes the same flags and reports the same counts: the 2 test shards, from the cache
    argv = ["--checkpoint", str(tmp_path / "run"), "--data", server.url, "--cache-dir", str(tmp_path / "cache")]
    assert evaluate_main([*argv, "--num-workers", "0", "--out", str(tmp_path / "eval")]) == 0
    assert read_json(tmp_path / "eval" / "eval.json")["cache"] == {
        "hits": 2,
        "downloads": 0,
        "bytes_downloaded": 0,
        "dir": cache["dir"],
    }
    assert tar_gets(server) == gets


@pytest.mark.slow
def test_a_two_process_run_streams_from_s3_fetching_each_shard_once(s3, tmp_path):
    """The issue's S3 case: moto behind the logging proxy (tests/s3server.py); 2 ranks x 2 loader workers x
    2 epochs, validation each epoch and the final test: each shard is one GET in the server's log."""
    base = f"s3://{s3.new_bucket('cache')}/small"
    pack = ["synthetic", "--num-classes", "3", "--image-size", "8", "--num-samples", "150", "--channels", "3"]
    pack += ["--shard-size", "25", "--val-fraction", "0.2", "--seed", "2", "--workers", "1", "--out", base]
    ok(
        subprocess.run(
            [sys.executable, "-m", "resnet_dist.shard", *pack],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=run_env(**s3.env),
            timeout=300,
        )
    )
    index = read_index(base)  # the s3 fixture points this process at the server too
    shards = [s for split in index.splits.values() for s in split.shards]
    s3.clear()
    out, cache_dir = tmp_path / "run", tmp_path / "cache"
    args = ["--data", base, "--out", str(out), "--cache-dir", str(cache_dir), "--epochs", "2", "--num-workers", "2"]
    args += ["--width", "8", "--batch-size", "8", "--lr", "0.05", "--wandb-mode", "disabled"]
    ok(train(*args, env=s3.env, timeout=500))
    prefix = "/" + base.removeprefix("s3://")
    gets = Counter(path for method, path, _ in s3.log if method == "GET" and path.endswith(".tar"))
    assert gets == Counter({f"{prefix}/{s.file}": 1 for s in shards}), gets
    cache = read_json(out / "summary.json")["cache"]
    assert cache["downloads"] == len(shards) and cache["bytes_downloaded"] == sum(s.bytes for s in shards)
    assert cache["hits"] >= len(index.splits["train"].shards)  # the second epoch: every train shard again
    assert entries(cache_dir) == {f"{s.sha256}.tar" for s in shards}
