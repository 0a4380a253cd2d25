"""A real artifact service on a free port in a thread, over a real artifacts tree in tmp_path,
with a secret file just outside the root that no request may ever read."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from model_trainer import log
from model_trainer.artifact_service.auth import TokenFile
from model_trainer.artifact_service.server import ArtifactHTTPServer, ServiceConfig

SECRET = b"TOPSECRET-do-not-serve-4f1b"
NAMESPACE = "default"
RUN = "run-a"
RUN_FILES = "/v1/namespaces/default/trainingruns/run-a/files"


@dataclass(frozen=True)
class Tree:
    root: Path
    run_dir: Path
    secret: Path
    model: bytes  # run-a/model.bin
    log_lines: list[bytes]  # run-a/logs.jsonl, newline-terminated


def log_line(i: int) -> bytes:
    return json.dumps({"event": "step", "step": i, "loss": 1.0 / (i + 1)}).encode() + b"\n"


def build_tree(tmp_path: Path) -> Tree:
    """root/default/trainingruns/run-a with a manifest, nested files, a log and two symlinks
    that point out of the job directory; root/default/tokenizerjobs/tok; root/evil, a
    namespace that is a symlink out of the root."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    outside = tmp_path / "outside" / "trainingruns" / "x"
    outside.mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET)

    root = tmp_path / "artifacts"
    run_dir = root / NAMESPACE / "trainingruns" / RUN
    (run_dir / "eval").mkdir(parents=True)
    model = os.urandom(300_000)
    (run_dir / "model.bin").write_bytes(model)
    (run_dir / "config.json").write_text('{"n_layer": 2}\n')
    (run_dir / "eval" / "metrics.json").write_text('{"loss": 1.5}\n')
    lines = [log_line(i) for i in range(50)]
    (run_dir / "logs.jsonl").write_bytes(b"".join(lines))
    files = {
        rel: hashlib.sha256((run_dir / rel).read_bytes()).hexdigest()
        for rel in ("model.bin", "config.json", "eval/metrics.json")
    }
    manifest = {"status": "succeeded", "files": files}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "leak").symlink_to(secret)
    (run_dir / "escape-dir").symlink_to(tmp_path)
    (run_dir / "inner-link.bin").symlink_to("model.bin")

    tok_dir = root / NAMESPACE / "tokenizerjobs" / "tok"
    tok_dir.mkdir(parents=True)
    (tok_dir / "tokenizer.json").write_text("{}\n")
    (root / "evil").symlink_to(tmp_path / "outside")
    return Tree(root=root, run_dir=run_dir, secret=secret, model=model, log_lines=lines)


@contextlib.contextmanager
def running(
    root: Path, token_file: Path | None = None, heartbeat_seconds: float = 0.3
) -> Iterator[ArtifactHTTPServer]:
    # The request line is logged after the response, maybe after the test has moved on: keep it
    # off the terminal.
    log.configure("info", stream=io.StringIO())
    config = ServiceConfig(
        root=root,
        tokens=TokenFile(token_file) if token_file is not None else None,
        poll_seconds=0.05,
        heartbeat_seconds=heartbeat_seconds,
        socket_timeout_seconds=5.0,
    )
    server = ArtifactHTTPServer(("127.0.0.1", 0), config)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> dict[str, object]:
        body = json.loads(self.body)
        assert isinstance(body, dict)
        return body


def request(
    port: int, target: str, method: str = "GET", headers: dict[str, str] | None = None
) -> Reply:
    """One request with the target sent exactly as given (no normalisation of `..` or `%`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()
