"""The artifact service: the artifacts volume over HTTP, read-only, standard library only.

    GET /healthz, /readyz                                   (never need the token)
    GET /v1/namespaces/{ns}/{kind}                          jobs with artifacts
    GET /v1/namespaces/{ns}/{kind}/{name}/files             every file: path, size, mtime, sha256
    GET|HEAD /v1/namespaces/{ns}/{kind}/{name}/files/{path} one file; Range, ETag, digests
    GET /v1/namespaces/{ns}/{kind}/{name}/logs?tail=N[&follow=true][&timeout=S]

`kind` is `tokenizerjobs` or `trainingruns` (or the singular). With a token file, every other
endpoint needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import email.utils
import json
import mimetypes
import os
import re
import select
import signal
import socket
import stat
import threading
import time
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import BinaryIO
from urllib.parse import parse_qs

from model_trainer import __version__, log
from model_trainer.artifact_service.auth import TokenFile
from model_trainer.artifact_service.digests import DigestCache
from model_trainer.artifact_service.logtail import LogFollower, tail_start
from model_trainer.artifact_service.paths import (
    RequestError,
    file_segments,
    inside_job,
    is_valid_name,
    job_directory,
    job_file,
    kind_directory,
    kind_segment,
    name_segment,
    namespace_segment,
)
from model_trainer.artifact_service.ranges import ByteRange, RangeNotSatisfiable, parse_range
from model_trainer.artifacts import LOGS_NAME, MANIFEST_NAME, is_being_written
from model_trainer.errors import TrainerError

logger = log.get_logger(__name__)

API_VERSION = "v1"
_NDJSON = "application/x-ndjson"
_SSE = "text/event-stream"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    root: Path
    tokens: TokenFile | None = None
    poll_seconds: float = 0.5
    """How often a followed log is checked for new lines."""
    heartbeat_seconds: float = 15.0
    """Idle time after which an event stream gets a `: ping` comment, so proxies keep it open."""
    socket_timeout_seconds: float = 60.0
    """An idle keep-alive connection or a stalled client is dropped after this."""


class ArtifactHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], config: ServiceConfig) -> None:
        self.config = config
        self.digests = DigestCache()
        self.stopping = threading.Event()
        self._active = 0
        self._idle = threading.Condition()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, ArtifactRequestHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def request_started(self) -> None:
        with self._idle:
            self._active += 1

    def request_finished(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the requests in flight; whether they all ended."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)


def _rfc3339(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _query(query: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


def _int_param(params: dict[str, str], key: str) -> int | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise RequestError(400, f"{key} must be a non-negative integer")
    return int(value)


def _timeout_param(params: dict[str, str]) -> float | None:
    value = params.get("timeout")
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e9:
        raise RequestError(400, "timeout must be a positive number of seconds")
    return seconds


def _sse_event(offset: int, line: bytes) -> bytes:
    parts = _LINE_BREAK.split(line.decode("utf-8", "replace"))
    data = "".join(f"data: {part}\n" for part in parts)
    return f"id: {offset}\n{data}\n".encode()


class ArtifactRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"model-trainer-artifacts/{__version__}"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:
        """Silenced: each request gets one structured line instead."""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self._server().config.socket_timeout_seconds)

    def _server(self) -> ArtifactHTTPServer:
        server = self.server
        if not isinstance(server, ArtifactHTTPServer):
            raise TypeError("ArtifactRequestHandler serves only an ArtifactHTTPServer")
        return server

    # Methods --------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _not_allowed(self) -> None:
        self._handle(allowed=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _handle(self, allowed: bool = True) -> None:
        started = time.monotonic()
        self._status = 0
        self._sent = 0
        server = self._server()
        server.request_started()
        try:
            try:
                if not allowed:
                    raise RequestError(405, "the artifact service is read-only")
                self._route(server)
            except RequestError as exc:
                self._send_error_json(exc.status, exc.message)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away
        except Exception:
            logger.exception("request_failed", method=self.command, path=self.path[:1000])
            if self._status == 0:
                self._send_error_json(500, "internal error")
            self.close_connection = True
        finally:
            server.request_finished()
            logger.info(
                "request",
                method=self.command,
                path=self.path[:1000],
                status=self._status,
                bytes=self._sent,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                client=self.client_address[0],
            )

    # Responses ------------------------------------------------------------------------------

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def _write(self, data: bytes) -> None:
        if self.command != "HEAD":
            self.wfile.write(data)
            self._sent += len(data)

    def _send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = (json.dumps(body, sort_keys=True) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self._write(data)

    def _send_error_json(self, status: int, message: str) -> None:
        headers: dict[str, str] = {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="model-trainer-artifacts"'
        elif status == 405:
            headers["Allow"] = "GET, HEAD"
        self._send_json(status, {"error": message}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the base class finds before routing (a malformed request line), as JSON."""
        self.close_connection = True
        self._send_json(code, {"error": message or HTTPStatus(code).phrase})

    def _send_file_range(self, handle: BinaryIO, offset: int, count: int) -> None:
        if self.command == "HEAD" or count == 0:
            return
        self.wfile.flush()
        sent = self.connection.sendfile(handle, offset, count)
        self._sent += sent
        if sent != count:  # the file shrank under us; the client must see a short body
            self.close_connection = True

    # Routing --------------------------------------------------------------------------------

    def _route(self, server: ArtifactHTTPServer) -> None:
        raw_path, _, query = self.path.partition("?")
        raw_path = raw_path.partition("#")[0]
        if not raw_path.startswith("/"):
            raise RequestError(400, "invalid request target")
        segments = raw_path[1:].split("/")
        if segments == ["healthz"]:
            self._send_json(200, {"status": "ok"})
            return
        if segments == ["readyz"]:
            self._readyz(server.config.root)
            return
        tokens = server.config.tokens
        if tokens is not None and not tokens.allows(self.headers.get("Authorization")):
            raise RequestError(401, "missing or wrong bearer token")
        if len(segments) < 4 or segments[:2] != [API_VERSION, "namespaces"]:
            raise RequestError(404, "no such endpoint")
        namespace = namespace_segment(segments[2])
        kind = kind_segment(segments[3])
        rest = segments[4:]
        if rest in ([], [""]):
            self._list_jobs(server.config.root, namespace, kind)
            return
        name = name_segment(rest[0])
        action, args = (rest[1], rest[2:]) if len(rest) > 1 else ("", [])
        if action == "files" and args in ([], [""]):
            self._list_files(server, job_directory(server.config.root, namespace, kind, name))
        elif action == "files":
            segments = file_segments(args)
            job = job_directory(server.config.root, namespace, kind, name)
            self._download(server, job, segments)
        elif action == "logs" and not args:
            job = job_directory(server.config.root, namespace, kind, name)
            self._logs(server, job, _query(query))
        else:
            raise RequestError(404, "no such endpoint")

    def _readyz(self, root: Path) -> None:
        if root.is_dir() and os.access(root, os.R_OK | os.X_OK):
            self._send_json(200, {"status": "ok"})
        else:
            self._send_json(503, {"error": "the artifacts root is missing or unreadable"})

    # Listings -------------------------------------------------------------------------------

    def _list_jobs(self, root: Path, namespace: str, kind: str) -> None:
        items: list[dict[str, object]] = []
        directory = kind_directory(root, namespace, kind)
        try:
            names = sorted(p.name for p in directory.iterdir()) if directory is not None else []
        except OSError:
            names = []
        for name in names:
            if not is_valid_name(name):
                continue
            try:
                job = job_directory(root, namespace, kind, name)
                modified = job.stat().st_mtime_ns
            except (RequestError, OSError):
                continue
            items.append({"name": name, "mtime": _rfc3339(modified), "status": _status_of(job)})
        self._send_json(
            200, {"apiVersion": API_VERSION, "namespace": namespace, "kind": kind, "items": items}
        )

    def _list_files(self, server: ArtifactHTTPServer, job: Path) -> None:
        files: list[dict[str, object]] = []
        for directory, dirnames, filenames in os.walk(job):
            dirnames[:] = sorted(d for d in dirnames if not is_being_written(d))
            for filename in filenames:
                if is_being_written(filename):
                    continue
                candidate = Path(directory) / filename
                real = inside_job(job, candidate)
                if real is None:
                    continue
                rel = candidate.relative_to(job).as_posix()
                try:
                    st = real.stat()
                    digest: str | None = server.digests.sha256(job, rel, real, st)
                except OSError:
                    continue
                files.append(
                    {
                        "path": rel,
                        "size": st.st_size,
                        "mtime": _rfc3339(st.st_mtime_ns),
                        "sha256": digest,
                    }
                )
        files.sort(key=lambda item: str(item["path"]))
        self._send_json(200, {"apiVersion": API_VERSION, "files": files})

    # Downloads ------------------------------------------------------------------------------

    def _download(self, server: ArtifactHTTPServer, job: Path, segments: list[str]) -> None:
        real = job_file(job, segments)
        try:
            handle = real.open("rb")
        except OSError as exc:
            raise RequestError(404, "no such file") from exc
        with handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise RequestError(404, "no such file")
            size = st.st_size
            digest = server.digests.sha256(job, "/".join(segments), real, st)
            etag = f'"{digest}"'
            last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            b64 = base64.b64encode(bytes.fromhex(digest)).decode()
            headers = {
                "ETag": etag,
                "Last-Modified": last_modified,
                "Accept-Ranges": "bytes",
                "Digest": f"sha-256={b64}",
                "Repr-Digest": f"sha-256=:{b64}:",
                "X-Checksum-Sha256": digest,
                "Cache-Control": "no-cache",
            }
            if _etag_matches(self.headers.get("If-None-Match"), etag):
                self._send_headers(304, headers)
                return
            byte_range: ByteRange | None = None
            if _range_applies(self.headers.get("If-Range"), etag, st.st_mtime):
                try:
                    byte_range = parse_range(self.headers.get("Range"), size)
                except RangeNotSatisfiable:
                    headers["Content-Range"] = f"bytes */{size}"
                    self._send_json(416, {"error": "range not satisfiable"}, headers)
                    return
            content_type = mimetypes.guess_type(segments[-1])[0] or "application/octet-stream"
            headers["Content-Type"] = content_type
            headers["X-Content-Type-Options"] = "nosniff"
            if byte_range is None:
                headers["Content-Length"] = str(size)
                self._send_headers(200, headers)
                self._send_file_range(handle, 0, size)
            else:
                headers["Content-Length"] = str(byte_range.length)
                headers["Content-Range"] = byte_range.content_range(size)
                self._send_headers(206, headers)
                self._send_file_range(handle, byte_range.start, byte_range.length)

    def _send_headers(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if status == 304:
            self.send_header("Content-Length", "0")
        self.end_headers()

    # Logs -----------------------------------------------------------------------------------

    def _logs(self, server: ArtifactHTTPServer, job: Path, params: dict[str, str]) -> None:
        tail = _int_param(params, "tail")
        timeout = _timeout_param(params)
        follow = params.get("follow", "").lower() in ("1", "true", "yes") or _SSE in (
            self.headers.get("Accept") or ""
        )
        if not follow:
            self._log_tail(job, tail)
            return
        resume_from = self.headers.get("Last-Event-ID", "").strip()
        if resume_from.isdigit():
            offset = int(resume_from)
        else:
            offset = 0
            real = inside_job(job, job / LOGS_NAME)
            if tail is not None and real is not None:
                with contextlib.suppress(OSError), real.open("rb") as handle:
                    offset = tail_start(handle, os.fstat(handle.fileno()).st_size, tail)
        self._follow(server, job, offset, timeout)

    def _log_tail(self, job: Path, tail: int | None) -> None:
        real = inside_job(job, job / LOGS_NAME)
        if real is None:
            raise RequestError(404, "no logs yet")
        with real.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            start = tail_start(handle, size, tail) if tail is not None else 0
            self.send_response(200)
            self.send_header("Content-Type", _NDJSON)
            self.send_header("Content-Length", str(size - start))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Log-Offset", str(size))
            self.end_headers()
            self._send_file_range(handle, start, size - start)

    def _follow(
        self, server: ArtifactHTTPServer, job: Path, offset: int, timeout: float | None
    ) -> None:
        config = server.config
        self.close_connection = True  # the stream ends when the connection does
        self.send_response(200)
        self.send_header("Content-Type", f"{_SSE}; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        follower = LogFollower(lambda: inside_job(job, job / LOGS_NAME), offset)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._write(b": following\n\n")
        last_write = time.monotonic()
        try:
            while not server.stopping.is_set():
                lines = follower.poll()
                if follower.truncated:
                    self._write(b"event: reset\ndata: truncated\n\n")
                for end, line in lines:
                    self._write(_sse_event(end, line))
                now = time.monotonic()
                if lines or follower.truncated:
                    last_write = now
                elif now - last_write >= config.heartbeat_seconds:
                    self._write(b": ping\n\n")
                    last_write = now
                if (deadline is not None and now >= deadline) or self._client_gone():
                    return
                if not lines:
                    server.stopping.wait(config.poll_seconds)
        finally:
            follower.close()

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


def _status_of(job: Path) -> str | None:
    try:
        status = json.loads((job / MANIFEST_NAME).read_bytes()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


def _etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    candidates = [c.strip().removeprefix("W/") for c in header.split(",")]
    return "*" in candidates or etag in candidates


def _range_applies(if_range: str | None, etag: str, mtime: float) -> bool:
    """If-Range: the range is served only while the validator still matches (RFC 9110 13.1.5)."""
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith(('"', "W/")):
        return if_range == etag  # strong comparison: a weak tag never matches
    try:
        when = email.utils.parsedate_to_datetime(if_range)
    except (TypeError, ValueError):
        return False
    return int(when.timestamp()) == int(mtime)


def serve(
    root: Path, host: str, port: int, token_file: Path | None, config: ServiceConfig | None = None
) -> int:
    """Serve until SIGTERM or SIGINT, then let the requests in flight finish (briefly)."""
    tokens = TokenFile(token_file) if token_file is not None else None
    config = dataclasses.replace(config or ServiceConfig(root=root), root=root, tokens=tokens)
    if not root.is_dir():
        logger.warning("artifacts_root_missing", root=str(root))
    try:
        server = ArtifactHTTPServer((host, port), config)
    except OSError as exc:
        raise TrainerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc

    def stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("artifacts_stopping", signal=signal.Signals(signum).name)
        server.stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    logger.info("artifacts_serving", host=host, port=server.port, root=str(root), auth=bool(tokens))
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        drained = server.drain(timeout=5.0)
        server.server_close()
        logger.info("artifacts_stopped", drained=drained)
    return 0
