"""Fixtures only; the helpers every test file shares live in helpers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import synthetic


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: an Accelerator made in this process by one test (the bench's
    bf16 step, say) would set the precision of the next test's in-process evaluate. Each test starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


@pytest.fixture(autouse=True)
def own_shard_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty shard cache of its own (runs it starts inherit $RESNET_DIST_CACHE): remote data
    is never cached in the user's ~/.cache, and a test's request counts never depend on an earlier test
    having cached the same (deterministic, so equal sha256) shards."""
    monkeypatch.setenv("RESNET_DIST_CACHE", str(tmp_path_factory.mktemp("shard-cache")))


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """A small 10-class, 16x16 RGB dataset with a learnable signal, in several uneven shards."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    options = dict(num_classes=4, image_size=16, num_samples=600, channels=3, shard_size=70, val_fraction=0.1)
    return synthetic(out, **options, seed=1)


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    """Like synthetic_shards, with eval splits no world size divides: val 61 (prime), test 121 (11 x 11).

    An even split hides a rank that drops the n % world_size leftover; these sizes leave one at every
    world size from 2 to 10."""
    out = tmp_path_factory.mktemp("data") / "uneven"
    options = dict(num_classes=4, image_size=16, num_samples=605, channels=3, shard_size=70, val_fraction=0.102)
    synthetic(out, **options, seed=1)
    splits = json.loads((out / "index.json").read_text())["splits"]
    assert (splits["train"]["num_samples"], splits["val"]["num_samples"], splits["test"]["num_samples"]) == (
        544,
        61,
        121,
    )
    return out


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server (+ fault proxy) on 127.0.0.1 for the whole session; tests use `s3`, not this."""
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install 'resnet-dist[dev]')")
    from s3server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's S3 server with an empty request log and no faults pending, and this process's
    environment pointed at it (for in-process clients); subprocesses take `run_env(**s3.env)`."""
    s3_server.clear()
    for name in s3_server.ENV_DROP:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    yield s3_server
    s3_server.clear()
