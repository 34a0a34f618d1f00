"""A real S3-compatible server on loopback for the tests: moto's server mode behind a small proxy that
injects faults and logs requests.

    with S3Server() as s3:
        s3.make_bucket("b")
        subprocess.run([...], env=run_env(**s3.env))    # clients reach the proxy via AWS_ENDPOINT_URL
        s3.inject("503", "/b/train-000000.tar", times=2) # the next 2 matching requests answer 503 SlowDown
        [(method, path, status), ...] = s3.log           # every request the proxy saw, in order

Why a proxy and not moto alone: moto answers every request correctly and accepts any credentials. The
faults a real store produces (503 SlowDown under load, a reset connection, a body cut short) and a refused
access key have to come from something between the client and moto. Both bind port 0 on 127.0.0.1.

Fault kinds (inject):
- "503": an S3 `SlowDown` error with its XML body; the request never reaches moto.
- "reset": the request is read, then the connection is closed with a TCP RST and no response.
- "short": the request is forwarded; the response goes back with its full Content-Length but only half its
  body, then the connection closes.
- "403": an S3 `AccessDenied` error (a store that refuses a write, say).
Bad credentials: requests signed with an access key id other than `S3Server.ACCESS_KEY` answer 403
`InvalidAccessKeyId`, as AWS does (moto itself accepts any key).
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import struct
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCESS_KEY = "resnet-dist-test-key"
# Distinctive, so a test can grep a whole run directory and its output for it.
SECRET_KEY = "SeCrEt-9f3c1e7d-never-in-a-run-dir"
REGION = "us-east-1"

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


def _error_xml(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>resnet-dist-test</RequestId></Error>"
    ).encode()


class _Rule:
    def __init__(self, kind: str, path: str, times: int, method: str | None):
        self.kind, self.path, self.times, self.method = kind, path, times, method


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore expects from S3
    server: _Proxy

    def log_message(self, *args):  # quiet: the request log is self.server.log
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, send: bytes | None = None) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body if send is None else send)
        self.wfile.flush()

    def _error(self, status: int, code: str, message: str) -> None:
        self._reply(status, [("Content-Type", "application/xml")], _error_xml(code, message))

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout turns close() into a TCP RST: the client sees "connection reset".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if "Transfer-Encoding" in self.headers:
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def _handle(self) -> None:
        body = self._body()
        path = self.path.split("?", 1)[0]
        key = _CREDENTIAL.search(self.headers.get("Authorization", ""))
        if key is None or key.group(1) != ACCESS_KEY:
            self.server.record(self.command, path, 403)
            self._error(403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")
            return
        kind = self.server.take_fault(self.command, path)
        self.server.record(self.command, path, kind or "")
        if kind == "503":
            self._error(503, "SlowDown", "Please reduce your request rate.")
        elif kind == "403":
            self._error(403, "AccessDenied", "Access Denied")
        elif kind == "reset":
            self._reset()
        else:
            status, headers, data = self._forward(body)
            self.server.set_status(status)
            if kind == "short" and len(data) > 1:
                self._reply(status, headers, data, send=data[: len(data) // 2])
                self.close_connection = True
            else:
                self._reply(status, headers, data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: tuple[str, int]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self.lock = threading.Lock()
        self.rules: list[_Rule] = []
        self.log: list[tuple[str, str, int | str]] = []
        self._local = threading.local()

    def take_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            for rule in self.rules:
                if rule.times > 0 and rule.path in path and rule.method in (None, method):
                    rule.times -= 1
                    return rule.kind
        return None

    def record(self, method: str, path: str, kind: int | str) -> None:
        with self.lock:
            self.log.append((method, path, kind))
            self._local.index = len(self.log) - 1

    def set_status(self, status: int) -> None:
        # A forwarded request is logged before moto answers; fill in moto's status (or "short:STATUS").
        with self.lock:
            i = self._local.index
            method, path, kind = self.log[i]
            self.log[i] = (method, path, f"short:{status}" if kind == "short" else status)


class S3Server:
    """moto in server mode on 127.0.0.1 (port 0) behind the fault-injecting proxy; see the module docstring."""

    ACCESS_KEY = ACCESS_KEY
    SECRET_KEY = SECRET_KEY

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._proxy: _Proxy | None = None
        self._thread: threading.Thread | None = None
        self._nowhere = tempfile.mkdtemp(prefix="no-aws-config-")

    def start(self) -> S3Server:
        # werkzeug logs each request moto serves to stderr; the proxy's log is the record the tests use.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._moto.start()
        self.moto_endpoint = "http://{}:{}".format(*self._moto.get_host_and_port())
        self._proxy = _Proxy(self._moto.get_host_and_port())
        self._thread = threading.Thread(target=self._proxy.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._proxy.server_address[1]}"
        return self

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
        self._moto.stop()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client process: this server, the test keys, and no ~/.aws file that could
        name another profile, region or endpoint (AWS_CONFIG_FILE/AWS_SHARED_CREDENTIALS_FILE point at an
        empty folder's missing files)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.path.join(self._nowhere, "config"),
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(self._nowhere, "credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",  # no 1-second probe of 169.254.169.254 for credentials
        }

    # Variables that would override or add to `env` if inherited from the test runner's environment.
    ENV_DROP = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION")

    @property
    def log(self) -> list[tuple[str, str, int | str]]:
        """(method, path without query, status) per request: moto's status, 403 for a refused key, or the
        injected fault's kind ("503", "reset", "403", "short:STATUS")."""
        with self._proxy.lock:
            return list(self._proxy.log)

    def clear(self) -> None:
        """Forget the log and any faults not yet used up (between tests sharing one server)."""
        with self._proxy.lock:
            self._proxy.log.clear()
            self._proxy.rules.clear()

    def inject(self, kind: str, path: str, times: int = 1, method: str | None = None) -> None:
        """The next `times` requests whose path contains `path` (and with `method`, if given) get fault `kind`."""
        if kind not in ("503", "reset", "short", "403"):
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._proxy.lock:
            self._proxy.rules.append(_Rule(kind, path, times, method))

    def client(self):
        """A boto3 S3 client talking to moto directly (setup and inspection stay out of the proxy's log)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.moto_endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def new_bucket(self, prefix: str = "bucket") -> str:
        """A fresh bucket with a unique name: moto keeps its state for the whole session."""
        return self.make_bucket(f"{prefix}-{uuid.uuid4().hex[:10]}")

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """{key: size} of every object under `prefix`."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}
