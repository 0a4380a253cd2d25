"""The artifact service over real HTTP against real files: listings, downloads with ranges and
digests, auth, path traversal, log tails and followed logs (Server-Sent Events), and `serve` in
a process that cannot import torch, transformers or tokenizers."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifact_service_support import (
    RUN_FILES,
    SECRET,
    Tree,
    build_tree,
    log_line,
    request,
    running,
)
from controlplane import free_port
from model_trainer.artifact_service.logtail import tail_start
from model_trainer.artifact_service.server import ArtifactHTTPServer, serve
from model_trainer.errors import InvalidInputError


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build_tree(tmp_path)


@pytest.fixture
def server(tree: Tree) -> Iterator[ArtifactHTTPServer]:
    with running(tree.root) as srv:
        yield srv


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Health and listings ---------------------------------------------------------------------------


def test_health_endpoints_answer_without_a_token(tree: Tree, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    with running(tree.root, token_file) as srv:
        assert request(srv.port, "/healthz").status == 200
        assert request(srv.port, "/readyz").status == 200
        assert request(srv.port, RUN_FILES).status == 401
    with running(tmp_path / "missing-root") as srv:
        assert request(srv.port, "/healthz").status == 200
        not_ready = request(srv.port, "/readyz")
        assert not_ready.status == 503
        assert str(tmp_path) not in not_ready.body.decode()


def test_lists_jobs_of_a_kind(server: ArtifactHTTPServer) -> None:
    runs = request(server.port, "/v1/namespaces/default/trainingruns").json()
    assert runs["kind"] == "trainingruns"
    items = runs["items"]
    assert isinstance(items, list)
    assert [(i["name"], i["status"]) for i in items] == [("run-a", "succeeded")]
    singular = request(server.port, "/v1/namespaces/default/tokenizerjob/").json()["items"]
    assert isinstance(singular, list)
    assert [i["name"] for i in singular] == ["tok"]
    assert request(server.port, "/v1/namespaces/other/trainingruns").json()["items"] == []


def test_lists_files_with_sizes_and_sha256(server: ArtifactHTTPServer, tree: Tree) -> None:
    # Written after the manifest: its digest cannot come from the manifest.
    (tree.run_dir / "eval" / "late.json").write_text("{}\n")
    os.utime(tree.run_dir / "eval" / "late.json", ns=(time.time_ns() + 10**9,) * 2)
    # A file and a checkpoint still under their temporary names are not artifacts yet.
    (tree.run_dir / ".model.bin.k2j4.tmp").write_bytes(b"half")
    (tree.run_dir / ".step-00000010.x9.tmp").mkdir()
    (tree.run_dir / ".step-00000010.x9.tmp" / "model.safetensors").write_bytes(b"half")
    listing = request(server.port, RUN_FILES).json()
    files = listing["files"]
    assert isinstance(files, list)
    by_path = {f["path"]: f for f in files}
    # The symlinks out of the job directory are not listed; the one inside is.
    assert sorted(by_path) == [
        "config.json",
        "eval/late.json",
        "eval/metrics.json",
        "inner-link.bin",
        "logs.jsonl",
        "manifest.json",
        "model.bin",
    ]
    for path, entry in by_path.items():
        data = (tree.run_dir / path).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == sha256(data), path
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(entry["mtime"]))
    assert request(server.port, RUN_FILES + "/").json() == listing


# Downloads -------------------------------------------------------------------------------------


def test_download_sends_the_file_and_its_digests(server: ArtifactHTTPServer, tree: Tree) -> None:
    reply = request(server.port, RUN_FILES + "/model.bin")
    assert reply.status == 200
    assert reply.body == tree.model
    digest = sha256(tree.model)
    b64 = base64.b64encode(bytes.fromhex(digest)).decode()
    assert reply.headers["X-Checksum-Sha256"] == digest
    assert reply.headers["Digest"] == f"sha-256={b64}"
    assert reply.headers["Repr-Digest"] == f"sha-256=:{b64}:"
    assert reply.headers["ETag"] == f'"{digest}"'
    assert reply.headers["Accept-Ranges"] == "bytes"
    assert reply.headers["Content-Length"] == str(len(tree.model))
    assert reply.headers["Last-Modified"].endswith("GMT")
    nested = request(server.port, RUN_FILES + "/eval/metrics.json")
    assert nested.body == b'{"loss": 1.5}\n'
    assert nested.headers["Content-Type"] == "application/json"


def test_head_sends_the_headers_alone(server: ArtifactHTTPServer, tree: Tree) -> None:
    reply = request(server.port, RUN_FILES + "/model.bin", method="HEAD")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers["Content-Length"] == str(len(tree.model))
    assert reply.headers["X-Checksum-Sha256"] == sha256(tree.model)


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=1000-", 1000, 299_999),
        ("bytes=-50", 299_950, 299_999),
        ("bytes=299990-999999999", 299_990, 299_999),
        ("bytes=-999999999", 0, 299_999),
        ("bytes=7-7", 7, 7),
    ],
)
def test_one_range_gets_206(
    server: ArtifactHTTPServer, tree: Tree, header: str, start: int, end: int
) -> None:
    reply = request(server.port, RUN_FILES + "/model.bin", headers={"Range": header})
    assert reply.status == 206
    assert reply.body == tree.model[start : end + 1]
    assert reply.headers["Content-Range"] == f"bytes {start}-{end}/{len(tree.model)}"
    assert reply.headers["Content-Length"] == str(end - start + 1)
    # The digests describe the whole file, not the part.
    assert reply.headers["X-Checksum-Sha256"] == sha256(tree.model)


@pytest.mark.parametrize("header", ["bytes=300000-", "bytes=999999-1000000", "bytes=-0"])
def test_unsatisfiable_range_gets_416(server: ArtifactHTTPServer, header: str) -> None:
    reply = request(server.port, RUN_FILES + "/model.bin", headers={"Range": header})
    assert reply.status == 416
    assert reply.headers["Content-Range"] == "bytes */300000"
    assert reply.json() == {"error": "range not satisfiable"}


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=9-2", "lines=0-1", "bytes=a-b"])
def test_several_or_malformed_ranges_get_the_whole_file(
    server: ArtifactHTTPServer, tree: Tree, header: str
) -> None:
    reply = request(server.port, RUN_FILES + "/model.bin", headers={"Range": header})
    assert reply.status == 200
    assert reply.body == tree.model


def test_if_range_and_if_none_match(server: ArtifactHTTPServer, tree: Tree) -> None:
    etag = f'"{sha256(tree.model)}"'
    path = RUN_FILES + "/model.bin"
    same = request(server.port, path, headers={"Range": "bytes=0-3", "If-Range": etag})
    assert (same.status, same.body) == (206, tree.model[:4])
    changed = request(server.port, path, headers={"Range": "bytes=0-3", "If-Range": '"0000"'})
    assert (changed.status, changed.body) == (200, tree.model)
    modified = request(server.port, path, method="HEAD").headers["Last-Modified"]
    by_date = request(server.port, path, headers={"Range": "bytes=0-3", "If-Range": modified})
    assert by_date.status == 206
    cached = request(server.port, path, headers={"If-None-Match": etag})
    assert (cached.status, cached.body) == (304, b"")


def test_only_get_and_head_are_allowed(server: ArtifactHTTPServer, tree: Tree) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        reply = request(server.port, RUN_FILES + "/model.bin", method=method)
        assert reply.status == 405
        assert reply.headers["Allow"] == "GET, HEAD"
    assert (tree.run_dir / "model.bin").read_bytes() == tree.model


# Auth ------------------------------------------------------------------------------------------


def test_token_is_required_checked_and_reloaded(tree: Tree, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    with running(tree.root, token_file) as srv:
        path = RUN_FILES + "/config.json"
        missing = request(srv.port, path)
        assert missing.status == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        assert b"n_layer" not in missing.body
        for wrong in ("Bearer second-token", "Bearer first-tokenX", "Basic first-token", "Bearer"):
            assert request(srv.port, path, headers={"Authorization": wrong}).status == 401
        ok = request(srv.port, path, headers={"Authorization": "Bearer first-token"})
        assert (ok.status, ok.body) == (200, b'{"n_layer": 2}\n')
        # Unknown endpoints are hidden behind auth too.
        assert request(srv.port, "/v1/whatever").status == 401

        # A mounted Secret rotates by swapping the file: the new token works, the old does not.
        rotated = tmp_path / "token.new"
        rotated.write_text("second-token")
        rotated.replace(token_file)
        assert (
            request(srv.port, path, headers={"Authorization": "Bearer first-token"}).status == 401
        )
        new = request(srv.port, path, headers={"Authorization": "Bearer second-token"})
        assert new.status == 200
        # Emptied: nobody gets in.
        token_file.write_text("")
        assert request(srv.port, path, headers={"Authorization": "Bearer "}).status == 401
        assert (
            request(srv.port, path, headers={"Authorization": "Bearer second-token"}).status == 401
        )


def test_serve_refuses_an_empty_or_missing_token_file(tree: Tree, tmp_path: Path) -> None:
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    with pytest.raises(InvalidInputError, match="empty"):
        serve(tree.root, "127.0.0.1", 0, empty)
    with pytest.raises(InvalidInputError, match="cannot read"):
        serve(tree.root, "127.0.0.1", 0, tmp_path / "no-such-token")


# Path traversal --------------------------------------------------------------------------------

TRAVERSALS = [
    RUN_FILES + "/../../../../secret.txt",
    RUN_FILES + "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/secret.txt",
    RUN_FILES + "/%2E%2E/%2E%2E/%2E%2E/%2E%2E/secret.txt",
    RUN_FILES + "/..%2f..%2f..%2f..%2fsecret.txt",
    RUN_FILES + "/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
    RUN_FILES + "/%252e%252e/%252e%252e/%252e%252e/%252e%252e/secret.txt",
    RUN_FILES + "/..%5c..%5c..%5c..%5csecret.txt",
    RUN_FILES + "/..\\..\\..\\..\\secret.txt",
    RUN_FILES + "/./model.bin",
    RUN_FILES + "//etc/passwd",
    RUN_FILES + "/%2fetc%2fpasswd",
    RUN_FILES + "/leak",
    RUN_FILES + "/escape-dir/secret.txt",
    RUN_FILES + "/eval",
    RUN_FILES + "/eval/",
    RUN_FILES + "/model.bin%00.txt",
    RUN_FILES + "/%ff%fe",
    "/v1/namespaces/../trainingruns/run-a/files/model.bin",
    "/v1/namespaces/%2e%2e/trainingruns/run-a/files/model.bin",
    "/v1/namespaces/evil/trainingruns/x/files/secret.txt",
    "/v1/namespaces/default/secrets/run-a/files/model.bin",
    "/v1/namespaces/default/..%2f..%2f/run-a/files/model.bin",
    "/v1/namespaces/default/trainingruns/..%2f..%2f..%2f/files/secret.txt",
    "/v1/namespaces/default/trainingruns/%2e%2e/files/model.bin",
    "/v1/namespaces/default/trainingruns/Run_A/files/model.bin",
    "/v1/namespaces/default/trainingruns/run-a/logs/../files/model.bin",
    "/v1/namespaces/Default/trainingruns/run-a/files/model.bin",
    "/v1/../../secret.txt",
    "/../secret.txt",
    "http://127.0.0.1/../secret.txt",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_path_traversal_fails_and_leaks_nothing(
    server: ArtifactHTTPServer, tree: Tree, tmp_path: Path, target: str
) -> None:
    for method in ("GET", "HEAD"):
        reply = request(server.port, target, method=method)
        assert reply.status in (400, 403, 404), (method, reply.status)
        assert SECRET not in reply.body
        assert tree.model[:64] not in reply.body
        assert str(tmp_path).encode() not in reply.body
        if method == "GET":
            assert set(reply.json()) == {"error"}


def test_a_symlink_inside_the_job_directory_is_served(
    server: ArtifactHTTPServer, tree: Tree
) -> None:
    """The control for the traversal test: symlinks are refused for where they lead, not for
    being symlinks."""
    assert request(server.port, RUN_FILES + "/inner-link.bin").body == tree.model
    encoded = request(server.port, RUN_FILES + "/%65val/metrics%2Ejson")
    assert encoded.body == b'{"loss": 1.5}\n'


# Logs ------------------------------------------------------------------------------------------


class CountingRaw(io.FileIO):
    bytes_read = 0

    def readinto(self, buffer) -> int:
        n = super().readinto(buffer)
        self.bytes_read += n or 0
        return n or 0


def test_tail_reads_backwards_from_the_end(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    lines = [log_line(i) for i in range(100_000)]
    path.write_bytes(b"".join(lines))
    size = path.stat().st_size
    raw = CountingRaw(path, "r")
    with io.BufferedReader(raw, buffer_size=8192) as handle:
        start = tail_start(handle, size, 10)
        assert path.read_bytes()[start:] == b"".join(lines[-10:])
    assert raw.bytes_read < 200_000 < size


@pytest.mark.parametrize(
    ("content", "lines", "expected"),
    [
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc\n", 3, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 10, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 0, b""),
        (b"a\nb\nc", 1, b"c"),
        (b"a\nb\nc", 2, b"b\nc"),
        (b"", 5, b""),
        (b"\n\n\n", 2, b"\n\n"),
    ],
)
def test_tail_edges(tmp_path: Path, content: bytes, lines: int, expected: bytes) -> None:
    path = tmp_path / "f"
    path.write_bytes(content)
    with path.open("rb") as handle:
        assert content[tail_start(handle, len(content), lines) :] == expected


def test_logs_tail_over_http(server: ArtifactHTTPServer, tree: Tree) -> None:
    logs = "/v1/namespaces/default/trainingruns/run-a/logs"
    reply = request(server.port, logs + "?tail=3")
    assert reply.status == 200
    assert reply.body == b"".join(tree.log_lines[-3:])
    assert reply.headers["X-Log-Offset"] == str(len(b"".join(tree.log_lines)))
    assert request(server.port, logs).body == b"".join(tree.log_lines)
    assert request(server.port, logs + "?tail=x").status == 400
    missing = request(server.port, "/v1/namespaces/default/tokenizerjobs/tok/logs")
    assert missing.status == 404


class EventStream:
    """A raw SSE client on a socket, so a test sees every byte the server sends."""

    def __init__(self, port: int, target: str, headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        self.conn.request("GET", target, headers={"Accept": "text/event-stream", **(headers or {})})
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.response.headers["Content-Type"].startswith("text/event-stream")

    def next_event(self) -> tuple[str, list[str], list[str]]:
        """(event id, data lines, comments) of the next event; comments alone count as one."""
        event_id, data, comments = "", list[str](), list[str]()
        while True:
            line = self.response.readline().decode().rstrip("\n")
            if line == "":
                if data or comments:
                    return event_id, data, comments
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "":
                comments.append(value)
            elif field == "id":
                event_id = value
            elif field == "data":
                data.append(value)
            elif field == "event":
                comments.append(f"event={value}")

    def next_data(self) -> tuple[int, str]:
        while True:
            event_id, data, _ = self.next_event()
            if data and event_id:
                return int(event_id), "\n".join(data)

    def close(self) -> None:
        self.conn.close()


def test_follow_streams_the_tail_then_new_lines(server: ArtifactHTTPServer, tree: Tree) -> None:
    log = tree.run_dir / "logs.jsonl"
    stream = EventStream(server.port, "/v1/namespaces/default/trainingruns/run-a/logs?tail=2")
    try:
        first = [stream.next_data(), stream.next_data()]
        assert [d for _, d in first] == [line.decode().strip() for line in tree.log_lines[-2:]]
        assert first[-1][0] == log.stat().st_size

        whole = b'{"event": "new", "n": 1}\n'
        end_of_whole = log.stat().st_size + len(whole)
        with log.open("ab") as handle:
            handle.write(whole + b'{"event": "half')
            handle.flush()
            assert stream.next_data() == (end_of_whole, '{"event": "new", "n": 1}')
            time.sleep(0.2)  # the half line is not sent before its end arrives
            handle.write(b'", "n": 2}\n')
        assert stream.next_data() == (log.stat().st_size, '{"event": "half", "n": 2}')

        # Idle: heartbeat comments keep proxies from closing the stream.
        assert "ping" in stream.next_event()[2]

        # Truncated (a new run): a reset event, then the new file from its start.
        log.write_bytes(b'{"event": "restarted"}\n')
        event_id, data = stream.next_data()
        assert (event_id, data) == (23, '{"event": "restarted"}')
    finally:
        stream.close()


def test_follow_resumes_from_last_event_id_and_ends_at_timeout(
    server: ArtifactHTTPServer, tree: Tree
) -> None:
    log = tree.run_dir / "logs.jsonl"
    offset = len(b"".join(tree.log_lines[:-1]))
    stream = EventStream(
        server.port,
        "/v1/namespaces/default/trainingruns/run-a/logs?follow=true&tail=5&timeout=0.5",
        headers={"Last-Event-ID": str(offset)},
    )
    try:
        assert stream.next_data() == (log.stat().st_size, tree.log_lines[-1].decode().strip())
        started = time.monotonic()
        rest = stream.response.read()  # the server ends the stream at the timeout
        assert time.monotonic() - started < 3
        assert all(line.startswith(b":") for line in rest.split(b"\n") if line), rest
    finally:
        stream.close()


def test_follow_stops_when_the_client_leaves(server: ArtifactHTTPServer) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"GET /v1/namespaces/default/trainingruns/run-a/logs?follow=true&tail=1 HTTP/1.1\r\n"
        b"Host: x\r\n\r\n"
    )
    assert b"200 OK" in sock.recv(4096)
    assert not server.drain(timeout=0.3)  # the follow is in flight
    sock.close()
    assert server.drain(timeout=3)


def test_follow_waits_for_a_log_that_does_not_exist_yet(
    server: ArtifactHTTPServer, tree: Tree
) -> None:
    stream = EventStream(server.port, "/v1/namespaces/default/tokenizerjobs/tok/logs?follow=1")
    try:
        (tree.root / "default" / "tokenizerjobs" / "tok" / "logs.jsonl").write_text('{"a": 1}\n')
        assert stream.next_data() == (9, '{"a": 1}')
    finally:
        stream.close()


# The operator image ----------------------------------------------------------------------------

BLOCKED_START = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "tokenizers"):
            raise ImportError("blocked in this test: " + name)
        return None

sys.meta_path.insert(0, Blocker())
for blocked in ("torch", "transformers", "tokenizers"):
    try:
        __import__(blocked)
    except ImportError:
        pass
    else:
        sys.exit(99)
from model_trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_runs_where_torch_cannot_be_imported(tree: Tree, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token = "tok-" + os.urandom(8).hex()
    token_file.write_text(token)
    port = free_port()
    env = {**os.environ, "MT_ARTIFACTS_TOKEN_FILE": str(token_file)}
    args = ["artifacts", "serve", "--root", str(tree.root), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_START, *args, "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if request(port, "/readyz").status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        auth = {"Authorization": f"Bearer {token}"}
        assert request(port, RUN_FILES + "/model.bin", headers=auth).body == tree.model
        assert request(port, RUN_FILES + "/model.bin").status == 401
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.decode()
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    assert token not in text
    assert '"event": "artifacts_serving"' in text
    assert '"event": "artifacts_stopped"' in text
    request_lines = [line for line in text.splitlines() if '"event": "request"' in line]
    assert any(
        all(f'"{key}"' in line for key in ("method", "path", "status", "bytes", "duration_ms"))
        and '"status": 200' in line
        and f'"bytes": {len(tree.model)}' in line
        for line in request_lines
    ), request_lines
