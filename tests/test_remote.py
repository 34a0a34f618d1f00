"""Shards in an object store: a real S3-compatible server (moto, server mode) on 127.0.0.1 behind a proxy
that injects the faults a store produces (tests/s3server.py); gs:// and hf:// through fsspec's memory
file system standing in for gcsfs and HfFileSystem (no server of theirs runs locally).

Not tested here, for want of a local server: real GCS, Azure and Hugging Face authentication and their
clients' own retry policies (gcsfs, azure-core, huggingface_hub)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, ok, read_json, run_env, shard, train

from resnet_dist import storage
from resnet_dist.errors import DataError, UsageError

SMALL = ["--num-classes", "3", "--image-size", "8", "--num-samples", "120", "--channels", "3", "--seed", "2"]
SMALL += ["--shard-size", "25", "--val-fraction", "0.2", "--workers", "1"]


def cli(args: list[str], env: dict, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m resnet_dist.shard ARGS` with the server's environment (and `env` on top)."""
    return shard(*args, timeout=timeout, env=env, **kw)


def one_line(result: subprocess.CompletedProcess, code: int, message: str) -> str:
    """Exit `code` (run_cli gives 2 for usage and data errors alike) and exactly one `error:` line holding
    `message` on stderr: no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr[-3000:]
    assert message in result.stderr, result.stderr
    return result.stderr


def staged(tmp: Path) -> list[Path]:
    return list(tmp.iterdir())


@pytest.fixture
def s3_shards(s3, tmp_path) -> str:
    """SMALL synthetic shards packed straight into s3://shards/small by the CLI."""
    base = f"s3://{s3.new_bucket('shards')}/small"
    ok(cli(["synthetic", *SMALL, "--out", base], {**s3.env, "TMPDIR": str(tmp_path)}))
    assert staged(tmp_path) == []  # the staging folder is gone
    return base


def where(base: str) -> tuple[str, str]:
    """(bucket, request path prefix) of an s3:// base."""
    bucket = base.split("/")[2]
    return bucket, "/" + base.removeprefix("s3://")


def test_shard_out_s3_uploads_every_shard_then_the_index(s3, s3_shards):
    bucket, prefix = where(s3_shards)
    objects = s3.objects(bucket, "small/")
    index = storage.read_index(s3_shards)
    files = {f"small/{s.file}": s.bytes for split in index.splits.values() for s in split.shards}
    assert len(files) >= 4 and {k: objects[k] for k in files} == files  # every shard, at its recorded size
    tables = {f"small/{s.samples}" for split in index.splits.values() for s in split.shards}
    assert len(tables) == len(files) and set(objects) == set(files) | tables | {"small/index.json"}
    puts = [path for method, path, _ in s3.log if method == "PUT"]
    assert puts[-1] == f"{prefix}/index.json" and len(puts) == len(objects)  # the index last, once
    storage.check_shards(s3_shards, index, list(index.splits))


def test_shard_out_s3_refuses_to_replace_without_overwrite(s3, s3_shards, tmp_path):
    bucket, _ = where(s3_shards)
    before = s3.objects(bucket, "small/")
    one_line(cli(["synthetic", *SMALL, "--out", s3_shards], s3.env), 2, "pass --overwrite")
    ok(cli(["synthetic", *SMALL, "--seed", "3", "--out", s3_shards, "--overwrite"], s3.env))
    index = storage.read_index(s3_shards)
    tables = {f"small/{s.samples}" for split in index.splits.values() for s in split.shards}
    # the same shard names; the tables are named by content, so new ones, and none of the old left behind
    after = set(s3.objects(bucket, "small/"))
    assert after - tables == {k for k in before if "/samples-" not in k} and tables <= after
    assert index.args["seed"] == 3


def test_verify_reads_s3(s3, s3_shards):
    result = cli(["verify", s3_shards], s3.env)
    assert result.returncode == 0 and "every shard matches" in result.stdout, result.stderr


def test_shard_out_to_a_missing_bucket_is_one_line_and_leaves_nothing(s3, tmp_path):
    result = cli(["synthetic", *SMALL, "--out", "s3://no-such-bucket/x"], {**s3.env, "TMPDIR": str(tmp_path)})
    one_line(result, 2, "s3://no-such-bucket: no such bucket")
    assert staged(tmp_path) == []


def test_a_refused_upload_is_one_line_and_a_rerun_finishes(s3, tmp_path):
    bucket = s3.new_bucket("refuse")
    s3.inject("403", f"/{bucket}/x/train-000001.tar", times=1, method="PUT")
    env = {**s3.env, "TMPDIR": str(tmp_path)}
    one_line(cli(["synthetic", *SMALL, "--out", f"s3://{bucket}/x"], env), 2, "access denied")
    assert staged(tmp_path) == [] and "x/index.json" not in s3.objects(bucket)
    ok(cli(["synthetic", *SMALL, "--out", f"s3://{bucket}/x"], env))  # no --overwrite needed: no index was written
    assert "x/index.json" in s3.objects(bucket)


def test_injected_faults_are_retried(s3, s3_shards, monkeypatch):
    monkeypatch.setenv("RESNET_DIST_HTTP_BACKOFF", "0.01")
    monkeypatch.setenv("RESNET_DIST_HTTP_RETRIES", "4")
    index = storage.read_index(s3_shards)
    shard = index.splits["train"].shards[0]
    path = f"{where(s3_shards)[1]}/{shard.file}"
    for kind in ("503", "reset", "short"):
        s3.clear()
        s3.inject(kind, path, times=2, method="GET")
        assert len(storage.read_bytes(s3_shards, shard.file)) == shard.bytes, kind
        gets = [status for method, p, status in s3.log if method == "GET" and p == path]
        assert 2 < len(gets) <= 4 and gets[-1] == 200, (kind, gets)  # retried, within the tries


def test_a_fault_that_outlasts_the_tries_is_one_line(s3, s3_shards, monkeypatch):
    monkeypatch.setenv("RESNET_DIST_HTTP_BACKOFF", "0.01")
    monkeypatch.setenv("RESNET_DIST_HTTP_RETRIES", "3")
    for kind, cause in (("503", "reduce your request rate"), ("short", "body cut short")):
        s3.clear()
        s3.inject(kind, f"{where(s3_shards)[1]}/index.json", times=100, method="GET")
        with pytest.raises(DataError) as info:
            storage.read_index(s3_shards)
        message = str(info.value)
        assert message.startswith(f"{s3_shards}/index.json: ") and cause in message and "\n" not in message
        assert "gave up after 3 tries" in message
        assert len([1 for m, _, _ in s3.log if m == "GET"]) <= 3


def test_bad_credentials_are_one_line(s3, s3_shards):
    result = cli(["verify", s3_shards], {**s3.env, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG"})
    err = one_line(result, 2, "access denied")
    assert "Access Key Id you provided does not exist" in err and f"{s3_shards}/index.json" in err
    nothing = {**s3.env, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    one_line(cli(["verify", s3_shards], nothing), 2, f"{s3_shards}/index.json: no credentials (Unable to locate")


def test_training_streams_from_s3_and_no_secret_is_written(s3, s3_shards, tmp_path):
    """2 processes, 1 epoch, with one 503 and one cut body on the way; exact evaluation; the secret key
    appears in no file of the run and in no output."""
    s3.clear()
    prefix = where(s3_shards)[1]
    s3.inject("503", f"{prefix}/train-000000.tar", times=1, method="GET")
    s3.inject("short", f"{prefix}/train-000001.tar", times=1, method="GET")
    out = tmp_path / "run"
    args = ["--data", s3_shards, "--out", str(out), "--epochs", "1", "--width", "8", "--batch-size", "8"]
    env = {**s3.env, "RESNET_DIST_HTTP_BACKOFF": "0.01"}
    trained = ok(train(*args, "--lr", "0.05", "--num-workers", "1", "--wandb-mode", "offline", env=env, timeout=400))
    index = storage.read_index(s3_shards)
    summary = read_json(out / "summary.json")
    assert summary["eval_counts"]["val"] == index.splits["val"].num_samples
    assert summary["lost_eval_samples"]["val"] == 0 and summary["lost_train_samples"] == 0
    assert read_json(out / "config.json")["data"] == s3_shards
    gets = [p for m, p, status in s3.log if m == "GET" and p.endswith(".tar")]
    assert f"{prefix}/train-000000.tar" in gets and f"{prefix}/train-000001.tar" in gets
    # The evaluate command reads the same URL: every val sample, none lost, the run's own val accuracy.
    evaluated = subprocess.run(
        [sys.executable, "-m", "resnet_dist.evaluate", "--checkpoint", str(out), "--data", s3_shards, "--split", "val"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=run_env(**s3.env),
    )
    ok(evaluated)
    result = read_json(out / "eval-val" / "eval.json")
    assert result["count"] == result["expected_count"] == index.splits["val"].num_samples and result["lost"] == 0
    secret = s3.SECRET_KEY.encode()
    leaks = [p for p in out.rglob("*") if p.is_file() and secret in p.read_bytes()]  # W&B offline files too
    assert leaks == [] and s3.SECRET_KEY not in trained.stdout + trained.stderr + evaluated.stdout + evaluated.stderr


# --- failed local writes ------------------------------------------------------------------------------


def _small_files():
    # RLIMIT_FSIZE: a write past 20 KB fails with EFBIG from the kernel (SIGXFSZ ignored, so no signal
    # kills the process): a full disk, for this one process, without root.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_a_write_the_disk_refuses_is_one_line_leaves_nothing_and_a_rerun_works(tmp_path):
    out = tmp_path / "out"
    big = ["--num-classes", "3", "--image-size", "32", "--num-samples", "300", "--shard-size", "100"]
    args = ["synthetic", *big, "--workers", "1", "--out", str(out)]
    result = cli(args, {}, preexec_fn=_small_files)
    one_line(result, 2, "cannot write (File too large)")
    assert list(out.iterdir()) == []  # no .tmp, no orphan shards: the rerun needs no --overwrite
    ok(cli(args, {}))
    assert (out / "index.json").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_out_folder_without_permission_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    one_line(cli(["synthetic", *SMALL, "--out", str(locked / "x")], {}), 2, "cannot create (Permission denied)")
    one_line(cli(["synthetic", *SMALL, "--out", str(locked)], {}), 2, "not writable")


def test_a_missing_backend_names_its_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "adlfs" else real(name, *a))
    with pytest.raises(UsageError, match=r"az:// needs adlfs: pip install 'resnet-dist\[azure\]'"):
        storage.check_location("az://container/x", "--data")


def test_file_urls_and_plain_paths_are_the_same_folder(synthetic_shards, tmp_path):
    url = synthetic_shards.as_uri()  # file:///...
    assert not storage.is_remote(url) and storage.is_remote("s3://b/x") and storage.is_remote("https://h/x")
    assert storage.read_index(url) == storage.read_index(str(synthetic_shards))
    assert storage.list_files(url) == storage.list_files(str(synthetic_shards))
    storage.write_file((tmp_path / "copy").as_uri(), "index.json", synthetic_shards / "index.json")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["index.json"]  # no temporary left
    with pytest.raises(UsageError, match="cannot be listed: give a brace pattern"):
        storage.list_files("https://example.invalid/shards")


# --- gs:// and hf:// through fsspec ---------------------------------------------------------------------


@pytest.fixture
def memory_as(monkeypatch):
    """Make fsspec serve `scheme` from its memory file system (in this process): storage's generic fsspec
    path (filesystem(), cat, ls, put) runs as it would for gcsfs or HfFileSystem."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from resnet_dist import locations, remote

    def install(scheme: str) -> None:
        remote._clients.clear()
        monkeypatch.setattr(fsspec, "filesystem", lambda protocol, **kw: MemoryFileSystem())
        # The memory file system stands in for the backend, so its package (gcsfs, huggingface_hub) need not be
        # installed: the dev extra installs only s3fs. The missing-backend line is tested on its own.
        for module in (locations, remote):
            monkeypatch.setattr(module, "backend_missing", lambda scheme: None)

    yield install
    remote._clients.clear()
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs.clear()
    MemoryFileSystem.pseudo_dirs.append("")


@pytest.mark.parametrize("base", ["gs://bucket/small", "hf://datasets/org/name/small"])
def test_gs_and_hf_read_write_list_through_fsspec(base, memory_as, synthetic_shards):
    from resnet_dist.data import ShardStream

    memory_as(base.split("://")[0])
    for path in sorted(synthetic_shards.iterdir()):
        storage.write_file(base, path.name, path)
    assert storage.list_files(base) == sorted(p.name for p in synthetic_shards.iterdir())
    assert storage.exists(base, "index.json") and not storage.exists(base, "nothing.tar")
    index = storage.read_index(base)
    storage.check_shards(base, index, list(index.splits))
    stream = ShardStream(base, index, "val", batch_size=16, rank=0, world_size=1, train=False)
    assert sum(len(batch[1]) for batch in stream) == index.splits["val"].num_samples
    with pytest.raises(DataError, match="shard listed in index.json is missing"):
        storage.remove_file(base, index.splits["val"].shards[0].file)
        storage.check_shards(base, index, ["val"])


def test_shard_index_reads_foreign_shards_from_s3(s3, tmp_path):
    """Shards another tool wrote, already in a bucket: `shard index s3://...` lists and reads them there and
    writes index.json (and the per-sample tables) into a local --out that names the bucket as shard_base."""
    from test_foreign import check_index, webdataset_shards

    local = webdataset_shards(tmp_path / "wds")
    bucket = s3.new_bucket("foreign")
    for path in sorted(local.iterdir()):
        s3.client().upload_file(str(path), bucket, f"wds/{path.name}")
    base = f"s3://{bucket}/wds"
    ok(cli(["index", base, "--out", str(tmp_path / "idx")], s3.env))
    check_index(tmp_path / "idx", base, {"train": 48, "val": 19})
    gets = [path for method, path, _ in s3.log if method == "GET" and path.endswith(".tar")]
    assert sorted(gets) == sorted(f"/{bucket}/wds/{p.name}" for p in local.iterdir())  # each shard read once
    assert s3.objects(bucket, "wds/").keys() == {f"wds/{p.name}" for p in local.iterdir()}  # nothing written there
