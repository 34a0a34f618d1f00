"""Shards over HTTP against a real fault-injecting server on 127.0.0.1.

The server follows a scripted plan per file: the n-th request for a file gets the n-th action of its
plan (then `ok`, or the plan's last action forever if it is marked sticky). Nothing in
resnet_dist.storage is mocked: every fault is real socket behaviour that urllib meets.
"""

from __future__ import annotations

import re
import select
import shutil
import socket
import struct
import threading
import time
from collections import Counter
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from resnet_dist.data import Piece, read_piece
from resnet_dist.errors import DataError, UsageError
from resnet_dist.storage import CHECK_THREADS, check_shards, read_bytes, read_index

# RESNET_DIST_HTTP_TIMEOUT in these tests. Only a planned stall may time out: an ordinary answer from this
# loopback server takes milliseconds, and 2 s leaves room for a loaded machine (at 0.3 s a slow answer
# once timed out and was retried, which broke a request count).
TIMEOUT = 2.0
STALL_MAX = 60.0  # a stalled handler waits this long at most for the client to give up and hang up


class FaultServer:
    """ThreadingHTTPServer serving `root`, with per-file scripted faults and a log of every request."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.plans: dict[str, list[str]] = {}
        self.sticky: set[str] = set()  # files whose last planned action repeats forever
        self.head_refused: int | None = None  # answer every HEAD with this status (405/501)
        self.seen: Counter = Counter()  # (method, file) -> requests received
        self.ranges: list[str] = []  # Range headers received
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                server.handle(self, head=True)

            def do_GET(self):
                server.handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def plan(self, name: str, actions: list[str], sticky: bool = False) -> None:
        self.plans[name] = list(actions)
        if sticky:
            self.sticky.add(name)

    def next_action(self, method: str, name: str) -> str:
        with self.lock:
            self.seen[(method, name)] += 1
            plan = self.plans.get(name, [])
            if not plan:
                return "ok"
            return plan[0] if name in self.sticky and len(plan) == 1 else plan.pop(0)

    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        name = h.path.lstrip("/")
        method = "HEAD" if head else "GET"
        if h.headers.get("Range"):
            self.ranges.append(h.headers["Range"])
        if head and self.head_refused:
            with self.lock:
                self.seen[(method, name)] += 1
            return self.status(h, self.head_refused)
        action = self.next_action(method, name)
        path = self.root / name
        if action == "reset":  # RST before any response: SO_LINGER 0 makes close() abort the connection
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        if action == "stall":  # silent until the client times out and hangs up, however long that takes
            select.select([h.connection], [], [], STALL_MAX)
            h.close_connection = True
            return
        if action.isdigit():
            return self.status(h, int(action))
        if not path.is_file():
            return self.status(h, 404)
        data = path.read_bytes()
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        if head:
            return
        if action in ("half", "half-reset"):  # the promised length, then only half the bytes
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            if action == "half-reset":
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        assert action == "ok", action
        h.wfile.write(data)

    @staticmethod
    def status(h: BaseHTTPRequestHandler, code: int) -> None:
        body = f"status {code}\n".encode()
        h.send_response(code)
        if code == 429:
            h.send_header("Retry-After", "1")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fast_retries(monkeypatch):
    """Small timeout and backoff so every failure path ends in well under a second or two."""
    monkeypatch.setenv("RESNET_DIST_HTTP_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("RESNET_DIST_HTTP_RETRIES", "6")
    monkeypatch.setenv("RESNET_DIST_HTTP_BACKOFF", "0.01")
    # A proxy from the environment would sit between us and the loopback server.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(synthetic_shards, fast_retries):
    with FaultServer(synthetic_shards) as srv:
        yield srv


@pytest.fixture
def shard_name(synthetic_shards):
    return read_index(str(synthetic_shards)).splits["train"].shards[0].file


@pytest.mark.parametrize("fault", ["reset", "503", "500", "502", "504", "408", "half", "half-reset", "stall"])
def test_each_transient_fault_is_retried_and_the_bytes_are_exact(server, synthetic_shards, shard_name, fault):
    server.plan(shard_name, [fault])
    assert read_bytes(server.url, shard_name) == (synthetic_shards / shard_name).read_bytes()
    assert server.seen[("GET", shard_name)] == 2  # the fault, then one good try


def test_every_fault_in_a_row_then_success(server, synthetic_shards, shard_name):
    server.plan(shard_name, ["reset", "503", "half", "stall", "half-reset"])
    start = time.monotonic()
    assert read_bytes(server.url, shard_name) == (synthetic_shards / shard_name).read_bytes()
    assert server.seen[("GET", shard_name)] == 6
    assert time.monotonic() - start < TIMEOUT + 30  # one stall's timeout; the rest is fast, with room for load


def test_429_waits_for_retry_after(server, synthetic_shards, shard_name):
    # The server asks for 1 s; the 0.01 s backoff alone would hammer it again at once.
    server.plan(shard_name, ["429"])
    start = time.monotonic()
    assert read_bytes(server.url, shard_name) == (synthetic_shards / shard_name).read_bytes()
    assert time.monotonic() - start >= 0.9
    assert server.seen[("GET", shard_name)] == 2


def test_the_loader_reads_a_shard_cut_short_over_http_as_the_same_samples(server, synthetic_shards):
    """The loader's own path for a shard URL: fetched whole (the cut body retried), checked against
    index.json, then the same samples as from the folder."""
    shard = read_index(str(synthetic_shards)).splits["train"].shards[0]
    piece = Piece(shard, skip=0, take=shard.num_samples)
    server.plan(shard.file, ["half"])
    remote = read_piece(server.url, piece, strict=True)
    assert len(remote) == shard.num_samples
    assert remote == read_piece(str(synthetic_shards), piece, strict=True)


@pytest.mark.parametrize("code", [404, 403, 400, 410, 501])
def test_permanent_status_fails_at_once_with_one_line(server, code):
    server.plan("x.tar", [str(code)], sticky=True)
    with pytest.raises(DataError) as err:
        read_bytes(server.url, "x.tar")
    message = str(err.value)
    assert message == f"{server.url}/x.tar: HTTP {code} {HTTPStatus(code).phrase} (after 1 try)"
    assert "\n" not in message
    assert server.seen[("GET", "x.tar")] == 1  # at once: no retry, so no backoff either


def test_missing_file_is_a_404(server):
    with pytest.raises(DataError, match=r"/absent\.tar: HTTP 404 Not Found \(after 1 try\)$"):
        read_bytes(server.url, "absent.tar")


@pytest.mark.parametrize(
    "fault, cause",
    [
        ("503", r"HTTP 503 Service Unavailable"),
        ("reset", r"connection reset|server closed the connection"),
        ("half", r"body cut short \(\d+ of \d+ bytes\)"),
        ("stall", rf"timed out \(no data for {TIMEOUT:g} s\)"),
    ],
)
def test_fault_that_never_clears_gives_up_after_the_tries(server, monkeypatch, shard_name, fault, cause):
    monkeypatch.setenv("RESNET_DIST_HTTP_RETRIES", "3")
    server.plan(shard_name, [fault], sticky=True)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        read_bytes(server.url, shard_name)
    message = str(err.value)
    assert message.startswith(f"{server.url}/{shard_name}: ")
    assert message.endswith("(gave up after 3 tries)")
    assert "\n" not in message
    assert re.search(cause, message), message
    assert server.seen[("GET", shard_name)] == 3
    assert time.monotonic() - start < 3 * TIMEOUT + 30  # at most one timeout a try, with room for load


def test_connection_refused_is_retried_then_clear(fast_retries, monkeypatch):
    monkeypatch.setenv("RESNET_DIST_HTTP_RETRIES", "3")
    with socket.socket() as held:  # bound, never listening, held by this test: refused, and no one else's port
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(
            DataError,
            match=rf"^http://127.0.0.1:{port}/a.tar: connection refused "
            r"\(gave up after 3 tries\)$",
        ):
            read_bytes(f"http://127.0.0.1:{port}", "a.tar")
    assert time.monotonic() - start < 30  # no timeout is waited for; the bound leaves room for load


def test_backoff_doubles(server, monkeypatch, shard_name):
    # Waits with equal jitter are in [d/2, d] for d = 0.2, 0.4, 0.8. The waits asked for are recorded (and
    # still waited), so a loaded machine, which only makes waits longer, cannot fail this.
    monkeypatch.setenv("RESNET_DIST_HTTP_BACKOFF", "0.2")
    waits, real_sleep = [], time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: (waits.append(s), real_sleep(s)))
    server.plan(shard_name, ["503", "503", "503"])
    start = time.monotonic()
    read_bytes(server.url, shard_name)
    assert time.monotonic() - start >= 0.7
    assert len(waits) == 3 and all(d / 2 <= w <= d for w, d in zip(waits, [0.2, 0.4, 0.8])), waits
    assert server.seen[("GET", shard_name)] == 4


@pytest.mark.parametrize(
    "var, value",
    [
        ("RESNET_DIST_HTTP_RETRIES", "0"),
        ("RESNET_DIST_HTTP_RETRIES", "two"),
        ("RESNET_DIST_HTTP_TIMEOUT", "0"),
        ("RESNET_DIST_HTTP_BACKOFF", "-1"),
    ],
)
def test_bad_settings_are_a_usage_error(server, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(UsageError, match=rf"^{var} must be "):
        read_bytes(server.url, "index.json")
    assert sum(server.seen.values()) == 0


def test_local_read_error_names_the_path(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path}/nope.tar: cannot read \(No such file or directory\)$"):
        read_bytes(str(tmp_path), "nope.tar")


def test_read_index_over_a_flaky_server(server, synthetic_shards):
    server.plan("index.json", ["reset", "503", "half", "stall"])
    assert read_index(server.url) == read_index(str(synthetic_shards))
    assert server.seen[("GET", "index.json")] == 5


def test_read_index_gives_up_clearly(server, monkeypatch):
    monkeypatch.setenv("RESNET_DIST_HTTP_RETRIES", "2")
    server.plan("index.json", ["502"], sticky=True)
    with pytest.raises(DataError, match=r"/index.json: HTTP 502 Bad Gateway \(gave up after 2 tries\)$"):
        read_index(server.url)


# --- check_shards over HTTP: one HEAD per shard ---------------------------------------------------


@pytest.fixture
def shard_copy(synthetic_shards, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(synthetic_shards, copy)
    return copy


@pytest.fixture
def copy_server(shard_copy, fast_retries):
    with FaultServer(shard_copy) as srv:
        yield srv


def all_shards(index):
    return [s.file for split in index.splits.values() for s in split.shards]


def test_check_shards_passes_on_a_good_folder_with_one_head_each(copy_server):
    index = read_index(copy_server.url)
    check_shards(copy_server.url, index, list(index.splits))
    files = all_shards(index)
    assert {f: copy_server.seen[("HEAD", f)] for f in files} == {f: 1 for f in files}
    assert not any(copy_server.seen[("GET", f)] for f in files)  # no shard bytes read up front


def test_check_shards_catches_a_missing_shard(copy_server, shard_copy):
    index = read_index(copy_server.url)
    victim = index.splits["train"].shards[1].file
    (shard_copy / victim).unlink()
    with pytest.raises(DataError) as err:
        check_shards(copy_server.url, index, ["train", "val"])
    assert str(err.value) == f"{copy_server.url}/{victim}: shard listed in index.json is missing (HTTP 404)"


def test_check_shards_catches_a_truncated_shard(copy_server, shard_copy):
    index = read_index(copy_server.url)
    shard = index.splits["val"].shards[0]
    path = shard_copy / shard.file
    path.write_bytes(path.read_bytes()[:1024])
    with pytest.raises(DataError) as err:
        check_shards(copy_server.url, index, ["train", "val"])
    assert str(err.value) == f"{copy_server.url}/{shard.file}: 1024 bytes, index.json says {shard.bytes}"
    check_shards(copy_server.url, index, ["train"])  # only the splits asked for are checked


def test_check_shards_reports_the_first_problem_and_counts_the_rest(copy_server, shard_copy):
    index = read_index(copy_server.url)
    first, second = index.splits["train"].shards[:2]
    (shard_copy / first.file).unlink()
    (shard_copy / second.file).write_bytes(b"x")
    with pytest.raises(
        DataError,
        match=rf"/{first.file}: shard listed in index.json is missing \(HTTP 404\) "
        r"\(and 1 more shards with problems\)$",
    ):
        check_shards(copy_server.url, index, ["train"])


def test_check_shards_retries_a_flaky_head(copy_server):
    index = read_index(copy_server.url)
    files = all_shards(index)
    for f in files[:3]:
        copy_server.plan(f, ["reset", "503", "stall"])
    check_shards(copy_server.url, index, list(index.splits))
    assert [copy_server.seen[("HEAD", f)] for f in files[:3]] == [4, 4, 4]


@pytest.mark.parametrize("refusal", [405, 501])
def test_check_shards_falls_back_to_a_ranged_get_when_head_is_refused(copy_server, shard_copy, refusal):
    copy_server.head_refused = refusal
    index = read_index(copy_server.url)
    check_shards(copy_server.url, index, list(index.splits))
    files = all_shards(index)
    # Every shard was sized by a GET, and every GET asked for one byte: no full body was fetched. No exact
    # count: a try that times out on a loaded machine is retried, and that is still the property.
    assert all(copy_server.seen[("GET", f)] >= 1 for f in files)
    assert len(copy_server.ranges) == sum(copy_server.seen[("GET", f)] for f in files)
    assert set(copy_server.ranges) == {"bytes=0-0"}
    # This server ignores Range (as http.server does) and sends 200 + Content-Length; still a size check.
    shard = index.splits["train"].shards[0]
    (shard_copy / shard.file).write_bytes(b"tiny")
    with pytest.raises(DataError, match=rf"/{shard.file}: 4 bytes, index.json says {shard.bytes}$"):
        check_shards(copy_server.url, index, ["train"])


def test_check_shards_is_fast_for_hundreds_of_shards(shard_copy, fast_retries, monkeypatch):
    # 300 shard entries pointing at real files of the right size. Fast means CHECK_THREADS HEADs in flight
    # at once, which the server sees: it holds each HEAD until that many have arrived together (or 10 s have
    # passed, then lets everything through). A clock would measure the machine's load as well.
    from dataclasses import replace

    monkeypatch.setenv("RESNET_DIST_HTTP_TIMEOUT", "30")  # a held HEAD must not time out while it waits
    index = read_index(str(shard_copy))
    one = index.splits["train"].shards[0]
    many = []
    for i in range(300):
        name = f"many-{i:04d}.tar"
        (shard_copy / name).symlink_to(shard_copy / one.file)
        many.append(replace(one, file=name))
    index.splits["train"] = replace(index.splits["train"], shards=tuple(many))

    class GatedHead(FaultServer):
        in_flight = peak = 0
        opened = False
        gate = threading.Condition()

        def handle(self, h, head):
            with self.gate:
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                self.gate.notify_all()
                self.gate.wait_for(lambda: self.opened or self.peak >= CHECK_THREADS, timeout=10)
                self.opened = True
            try:
                super().handle(h, head)
            finally:
                with self.gate:
                    self.in_flight -= 1

    with GatedHead(shard_copy) as srv:
        check_shards(srv.url, index, ["train"])
    assert sum(srv.seen.values()) == 300
    assert srv.peak == CHECK_THREADS, srv.peak
