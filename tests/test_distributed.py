"""Synchronized BatchNorm, the world-size check and the bounded rendezvous, with real 2-process
`accelerate launch` runs on CPU (gloo)."""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import ROOT, SCRIPTS, TRAIN, launch, launch_cmd, run_env
from torch import nn

from resnet_dist.distributed import (
    DEFAULT_RENDEZVOUS_TIMEOUT_S,
    CPUSyncBatchNorm,
    convert_sync_batchnorm,
    rendezvous_timeout,
)
from resnet_dist.errors import UsageError

TOL = 1e-5


@pytest.fixture(scope="module")
def syncbn(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("syncbn")
    proc = launch(SCRIPTS / "syncbn_check.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "syncbn.json").read_text())


@pytest.mark.slow
def test_cpu_ddp_config_gives_two_connected_processes(syncbn: dict) -> None:
    assert syncbn["world_size"] == 2
    assert syncbn["backend"] == "gloo"
    assert syncbn["ranks"] == [0, 1]  # an all_gather over the group reached both


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bn2d", "bn1d", "bn1d_seq", "bn3d_no_affine"])
def test_sync_bn_equals_one_batchnorm_over_the_global_batch(syncbn: dict, case: str) -> None:
    diffs = syncbn["sync"][case]
    # outputs, input gradients, every weight/bias gradient (conv and BN) and every BN buffer
    assert {"output", "input_grad"} <= diffs.keys()
    assert any(k.startswith("grad.1.") for k in diffs) == (case != "bn3d_no_affine")
    assert {"buffer.1.running_mean", "buffer.1.running_var", "buffer.1.num_batches_tracked"} <= diffs.keys()
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"{case}: differs from one BatchNorm over the global batch: {bad}"


@pytest.mark.slow
def test_sync_bn_under_ddp_equals_one_batchnorm(syncbn: dict) -> None:
    # convert, then accelerator.prepare: the path training takes
    bad = {k: v for k, v in syncbn["ddp"].items() if not v <= TOL}
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bn2d", "bn1d"])
def test_the_comparison_fails_without_sync(syncbn: dict, case: str) -> None:
    # Plain BatchNorm on each half: if these were equal too, the test above would prove nothing.
    diffs = syncbn["unsynced"][case]
    for key in ("output", "input_grad", "grad.1.weight", "buffer.1.running_mean", "buffer.1.running_var"):
        assert diffs[key] > 1e-3, (key, diffs[key])


@pytest.mark.slow
def test_processes_that_did_not_join_one_group_stop_with_a_clear_error(tmp_path: Path) -> None:
    # The verified trap: MULTI_GPU launch on a CPU-only machine without Accelerator(cpu=True).
    proc = launch(SCRIPTS / "world_size_check.py", "no", str(tmp_path))
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert seen and all(s["WORLD_SIZE"] == "2" and s["num_processes"] == 1 for s in seen), seen
    assert proc.returncode != 0
    assert (
        "error: launched 2 processes (WORLD_SIZE=2) but this one sees 1: they did not join one process group; "
        "on a CPU-only machine launch with accelerate_configs/cpu_ddp.yaml"
    ) in proc.stderr


# Rendezvous: concurrent launches never meet, and a rank never waits for its peers without end or word.


@pytest.mark.slow
def test_concurrent_launches_each_form_their_own_group(tmp_path: Path) -> None:
    # Three at once, all given cpu_ddp.yaml's one port: each must gather its own two tokens and nothing else.
    runs = []
    for token in ("alpha", "bravo", "charlie"):
        (tmp_path / token).mkdir()
        cmd = [*launch_cmd(2), str(SCRIPTS / "group_token.py"), token, str(tmp_path / token)]
        runs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=run_env(OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)
        )
    for token, proc in zip(("alpha", "bravo", "charlie"), runs):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert json.loads((tmp_path / token / "group.json").read_text())["tokens"] == [token, token]


@pytest.fixture
def peer_port(request):
    """A port for rank 1's rendezvous, held by this test so no other job can take it: a real store that
    rank 0 never joins, a listener that never answers, or a bound socket that refuses connections."""
    if request.param == "store":
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        yield store.port, r"rank 0 of 2 never arrived \(did it start\? see its log\)"
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if request.param == "silent":
            sock.listen(8)  # the kernel completes the connection; nobody ever reads or writes
            yield sock.getsockname()[1], r"something listens there but does not answer as a rendezvous store"
        else:
            yield sock.getsockname()[1], r"nothing listens there \(is the launcher alive\?\)"


@pytest.mark.slow
@pytest.mark.parametrize("peer_port", ["store", "silent", "refused"], indirect=True)
def test_rendezvous_wait_is_bounded_and_ends_in_one_line(synthetic_shards, tmp_path, peer_port) -> None:
    port, cause = peer_port
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(TRAIN), "--data", str(synthetic_shards), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
        env=run_env(RESNET_DIST_RENDEZVOUS_TIMEOUT="3", **env),
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
    assert re.fullmatch(
        rf"\[rank 1\] error: no rendezvous at 127\.0\.0\.1:{port} within 3 s: {cause}.*; "
        r"RESNET_DIST_RENDEZVOUS_TIMEOUT sets the wait\n",
        result.stderr,
    ), result.stderr
    assert elapsed < DEFAULT_RENDEZVOUS_TIMEOUT_S / 2, elapsed  # the wait set, not the default 300 s


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan"])
def test_a_bad_rendezvous_timeout_is_a_usage_error(monkeypatch, value) -> None:
    monkeypatch.setenv("RESNET_DIST_RENDEZVOUS_TIMEOUT", value)
    with pytest.raises(
        UsageError, match=rf"^RESNET_DIST_RENDEZVOUS_TIMEOUT must be a number of seconds > 0, got '{value}'$"
    ):
        rendezvous_timeout()


# In-process: no process group, so CPUSyncBatchNorm must be exactly BatchNorm.


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 6)),
        nn.BatchNorm1d(6, momentum=None),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(3)
    return net


def test_convert_replaces_every_batchnorm_and_keeps_its_tensors() -> None:
    net = _bn_net().eval()
    before = copy.deepcopy(net.state_dict())
    weight = net[1].weight
    converted = convert_sync_batchnorm(net)
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 2 and all(type(m) is CPUSyncBatchNorm for m in bns)
    assert converted[4].momentum is None and not converted[1].training
    assert converted[1].weight is weight  # shared, so an optimizer built earlier still updates it
    after = converted.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert convert_sync_batchnorm(converted) is converted  # idempotent


def test_convert_a_bare_batchnorm_and_one_without_running_stats() -> None:
    bn = nn.BatchNorm3d(2, affine=False, track_running_stats=False)
    out = convert_sync_batchnorm(bn)
    assert type(out) is CPUSyncBatchNorm and out.weight is None and out.running_mean is None


def test_device_picks_torch_sync_batchnorm_off_the_cpu() -> None:
    # Conversion itself needs no GPU: the device argument alone selects torch's class for CUDA.
    out = convert_sync_batchnorm(_bn_net(), device="cuda")
    assert [type(m) for m in out.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [nn.SyncBatchNorm] * 2


@pytest.mark.parametrize("train", [True, False])
def test_without_a_process_group_it_is_plain_batchnorm(train: bool) -> None:
    plain = _bn_net().train(train)
    synced = convert_sync_batchnorm(copy.deepcopy(plain)).train(train)
    x = torch.randn(5, 3, 6, 6)
    for _ in range(2):
        torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    for (k, a), b in zip(synced.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k
