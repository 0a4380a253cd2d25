"""Client of the artifact service, standard library only: listings, downloads that resume and
verify their sha256, and logs (a tail, or followed as Server-Sent Events)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, BinaryIO
from urllib.parse import quote, urlencode

from model_trainer.artifact_service.paths import URL_KINDS
from model_trainer.artifacts import fsync_dir
from model_trainer.errors import ArtifactWriteError, InvalidInputError, TrainerError

DEFAULT_URL = "http://127.0.0.1:8082"
_CHUNK = 1 << 20
# The server sends a `: ping` every 15 s on an idle event stream.
FOLLOW_READ_TIMEOUT = 60.0

# The kinds the service's URLs take (plural and singular), and kubectl-style short names.
KIND_ALIASES = {**URL_KINDS, "tr": "trainingruns", "tj": "tokenizerjobs"}


class ServiceUnavailableError(TrainerError):
    reason = "ArtifactServiceUnavailable"


class UnauthorizedError(InvalidInputError):
    reason = "Unauthorized"


class NotFoundError(InvalidInputError):
    reason = "NotFound"


class ChecksumMismatchError(TrainerError):
    reason = "ChecksumMismatch"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the bearer token to wherever it points: refuse it."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> None:
        return None


class _RangeNotSatisfiable(Exception):
    def __init__(self, size: int | None) -> None:
        super().__init__(f"range not satisfiable (size {size})")
        self.size = size


@dataclass(frozen=True)
class Resource:
    kind: str  # the plural: trainingruns | tokenizerjobs
    name: str | None


def parse_resource(text: str) -> Resource:
    """`trainingrun/NAME`, `trainingruns/NAME`, `tr/NAME` (same for tokenizerjob, `tj`), or a
    kind alone, which lists that kind's jobs."""
    kind_text, slash, name = text.partition("/")
    kind = KIND_ALIASES.get(kind_text.lower().removesuffix(".modeltrainer.io"))
    if kind is None or (slash and not name) or "/" in name:
        raise InvalidInputError(
            f"cannot read resource {text!r}: use trainingrun/NAME or tokenizerjob/NAME "
            "(or tr/NAME, tj/NAME)"
        )
    return Resource(kind=kind, name=name or None)


@dataclass(frozen=True)
class JobEntry:
    name: str
    mtime: str
    status: str | None


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mtime: str
    sha256: str | None


@dataclass(frozen=True)
class Downloaded:
    path: str
    size: int
    sha256: str
    resumed_from: int


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read(64 * 1024) or b"{}")
    except (OSError, ValueError, http.client.HTTPException):
        body = None
    message = body.get("error") if isinstance(body, dict) else None
    return message if isinstance(message, str) else f"HTTP {exc.code}"


def _content_range(header: str | None) -> tuple[int, int]:
    """(first byte, full size) of `Content-Range: bytes a-b/size`."""
    try:
        unit, _, spec = (header or "").partition(" ")
        span, _, size = spec.partition("/")
        first = span.partition("-")[0]
        if unit != "bytes":
            raise ValueError(unit)
        return int(first), int(size)
    except ValueError as exc:
        raise TrainerError(f"the artifact service sent a bad Content-Range: {header}") from exc


def _hash_prefix(path: Path, size: int) -> hashlib._Hash:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        remaining = size
        while remaining > 0:
            block = handle.read(min(_CHUNK, remaining))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    return digest


class ArtifactsClient:
    def __init__(
        self, server: str, namespace: str, token: str | None = None, timeout: float = 30.0
    ) -> None:
        self._base = server.rstrip("/")
        self._namespace = namespace
        self._token = token or None
        self._timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirects())

    # HTTP -----------------------------------------------------------------------------------

    def _url(self, kind: str, *parts: str, query: dict[str, str] | None = None) -> str:
        segments = ["v1", "namespaces", self._namespace, kind, *parts]
        url = self._base + "/" + "/".join(quote(s, safe="") for s in segments)
        return url + ("?" + urlencode(query) if query else "")

    def _open(
        self,
        url: str,
        what: str,
        headers: dict[str, str] | None = None,
        method: str = "GET",
        timeout: float | None = None,
    ) -> http.client.HTTPResponse:
        request = urllib.request.Request(url, headers=dict(headers or {}), method=method)
        if self._token is not None:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            response = self._opener.open(request, timeout=timeout or self._timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                raise self._status_error(exc, what) from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        if not isinstance(response, http.client.HTTPResponse):
            raise TrainerError(f"unexpected response from {self._base}")
        return response

    def _unreachable(self, reason: object) -> ServiceUnavailableError:
        why = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        return ServiceUnavailableError(
            f"cannot reach the artifact service at {self._base} ({why}); is "
            "`kubectl port-forward svc/<release>-artifacts 8082:80` running? "
            "Otherwise pass --server or set MT_ARTIFACTS_URL"
        )

    def _status_error(self, exc: urllib.error.HTTPError, what: str) -> Exception:
        if exc.code == 416:
            size = exc.headers.get("Content-Range", "").rpartition("/")[2]
            return _RangeNotSatisfiable(int(size) if size.isdigit() else None)
        message = _error_message(exc)
        if exc.code == 401:
            if self._token is None:
                return UnauthorizedError(
                    "the artifact service needs a token: pass --token or set MT_ARTIFACTS_TOKEN"
                )
            return UnauthorizedError("the artifact service rejected the token")
        if exc.code == 404:
            return NotFoundError(f"{what}: {message}")
        if exc.code == 400:
            return InvalidInputError(f"{what}: {message}")
        return TrainerError(f"{what}: the artifact service answered {exc.code}: {message}")

    def _json(self, url: str, what: str) -> dict[str, object]:
        with self._open(url, what) as response:
            try:
                body = json.loads(response.read())
            except (OSError, ValueError, http.client.HTTPException) as exc:
                raise TrainerError(f"{what}: unreadable answer from the artifact service") from exc
        if not isinstance(body, dict):
            raise TrainerError(f"{what}: unexpected answer from the artifact service")
        return {str(k): v for k, v in body.items()}

    # Listings -------------------------------------------------------------------------------

    def jobs(self, kind: str) -> list[JobEntry]:
        what = f"{kind} in namespace {self._namespace}"
        items = self._json(self._url(kind), what).get("items")
        entries = []
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                status = item.get("status")
                entries.append(
                    JobEntry(
                        name=str(item["name"]),
                        mtime=str(item.get("mtime", "")),
                        status=status if isinstance(status, str) else None,
                    )
                )
        return entries

    def files(self, resource: Resource) -> list[FileEntry]:
        name = self._name(resource)
        what = f"{resource.kind}/{name} in namespace {self._namespace}"
        items = self._json(self._url(resource.kind, name, "files"), what).get("files")
        entries = []
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            path, size, sha = item.get("path"), item.get("size"), item.get("sha256")
            if isinstance(path, str) and isinstance(size, int):
                entries.append(
                    FileEntry(
                        path=path,
                        size=size,
                        mtime=str(item.get("mtime", "")),
                        sha256=sha if isinstance(sha, str) else None,
                    )
                )
        return entries

    @staticmethod
    def _name(resource: Resource) -> str:
        if resource.name is None:
            raise InvalidInputError(f"name the {resource.kind} job: {resource.kind}/NAME")
        return resource.name

    # Downloads ------------------------------------------------------------------------------

    def _file_url(self, resource: Resource, path: str) -> tuple[str, str]:
        name = self._name(resource)
        parts = [p for p in path.split("/") if p]
        if not parts:
            raise InvalidInputError("name a file inside the job's directory")
        return (
            self._url(resource.kind, name, "files", *parts),
            f"{path} of {resource.kind}/{name} in namespace {self._namespace}",
        )

    def download(self, resource: Resource, path: str, out: Path) -> Downloaded:
        """Download into `out` through `out.part`, resuming from an existing `.part`, and
        verify the whole file's sha256 before it takes its final name."""
        url, what = self._file_url(resource, path)
        part = out.with_name(out.name + ".part")
        for _ in range(2):
            offset = part.stat().st_size if part.exists() else 0
            try:
                return self._download_part(url, what, part, out, offset)
            except _RangeNotSatisfiable as exc:
                if exc.size is not None and exc.size == offset:
                    return self._finish(url, what, part, out, offset)
                part.unlink(missing_ok=True)  # longer than the file now: start afresh
        raise TrainerError(f"{what}: the download could not start")

    def _download_part(self, url: str, what: str, part: Path, out: Path, offset: int) -> Downloaded:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self._open(url, what, headers) as response:
            expected = response.headers.get("X-Checksum-Sha256")
            if response.status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    raise TrainerError(f"{what}: the artifact service resumed at byte {start}")
                digest = _hash_prefix(part, offset)
            else:
                offset, digest = 0, hashlib.sha256()
                total = int(response.headers.get("Content-Length", "-1"))
            try:
                sink = part.open("ab") if offset else part.open("wb")
            except OSError as exc:
                raise ArtifactWriteError(f"cannot write {part}: {exc.strerror}") from exc
            with sink:
                received = offset + _copy(response, sink, digest, part)
                _fsync(sink, part)
        if received != total:
            raise ServiceUnavailableError(
                f"{what}: the download stopped at byte {received} of {total}; "
                "run the command again to resume it"
            )
        return self._verified(what, part, out, digest.hexdigest(), expected, offset)

    def _finish(self, url: str, what: str, part: Path, out: Path, size: int) -> Downloaded:
        """The `.part` file already has every byte: check it against the server's digest."""
        with self._open(url, what, method="HEAD") as response:
            expected = response.headers.get("X-Checksum-Sha256")
        return self._verified(what, part, out, _hash_prefix(part, size).hexdigest(), expected, size)

    @staticmethod
    def _verified(
        what: str, part: Path, out: Path, actual: str, expected: str | None, resumed_from: int
    ) -> Downloaded:
        if expected is None:
            raise TrainerError(f"{what}: the artifact service sent no X-Checksum-Sha256")
        if actual != expected.strip().lower():
            part.unlink(missing_ok=True)
            raise ChecksumMismatchError(
                f"{what}: sha256 {actual} does not match {expected} from the artifact service; "
                "the partial download was removed"
            )
        size = part.stat().st_size
        try:
            part.replace(out)
            fsync_dir(out.parent)
        except OSError as exc:
            raise ArtifactWriteError(f"cannot write {out}: {exc.strerror}") from exc
        return Downloaded(path=str(out), size=size, sha256=actual, resumed_from=resumed_from)

    def stream(self, resource: Resource, path: str, sink: BinaryIO) -> Downloaded:
        """Write the file to `sink` (no resume) and verify its sha256 once it is all there."""
        url, what = self._file_url(resource, path)
        with self._open(url, what) as response:
            expected = response.headers.get("X-Checksum-Sha256")
            total = int(response.headers.get("Content-Length", "-1"))
            digest = hashlib.sha256()
            received = _copy(response, sink, digest, None)
            sink.flush()
        if received != total:
            raise ServiceUnavailableError(f"{what}: the download stopped at {received} of {total}")
        if expected is None or digest.hexdigest() != expected.strip().lower():
            raise ChecksumMismatchError(f"{what}: sha256 {digest.hexdigest()} != {expected}")
        return Downloaded(path="-", size=received, sha256=digest.hexdigest(), resumed_from=0)

    # Logs -----------------------------------------------------------------------------------

    def logs(self, resource: Resource, tail: int | None) -> Iterator[bytes]:
        """Chunks of logs.jsonl: the last `tail` lines, or all of it."""
        name = self._name(resource)
        query = {"tail": str(tail)} if tail is not None else None
        url = self._url(resource.kind, name, "logs", query=query)
        with self._open(url, f"logs of {resource.kind}/{name}") as response:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise self._unreachable(exc) from None
                if not chunk:
                    return
                yield chunk

    def follow(self, resource: Resource, tail: int | None) -> Iterator[str]:
        """Lines of logs.jsonl as they are written, until the server ends the stream."""
        name = self._name(resource)
        query = {"follow": "true", **({"tail": str(tail)} if tail is not None else {})}
        url = self._url(resource.kind, name, "logs", query=query)
        headers = {"Accept": "text/event-stream"}
        what = f"logs of {resource.kind}/{name}"
        with self._open(url, what, headers, timeout=FOLLOW_READ_TIMEOUT) as response:
            yield from _sse_messages(response)


def _sse_messages(response: http.client.HTTPResponse) -> Iterator[str]:
    """The data of each message event of a Server-Sent Events stream."""
    data: list[str] = []
    event = ""
    while True:
        try:
            raw = response.readline()
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceUnavailableError(f"the log stream broke off: {exc}") from None
        if not raw:
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data and event in ("", "message"):
                yield "\n".join(data)
            data, event = [], ""
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value


def _copy(
    response: http.client.HTTPResponse, sink: BinaryIO, digest: hashlib._Hash, path: Path | None
) -> int:
    copied = 0
    while True:
        try:
            chunk = response.read(_CHUNK)
        except (OSError, http.client.HTTPException):
            return copied  # the caller compares the count and keeps the .part to resume
        if not chunk:
            return copied
        digest.update(chunk)
        try:
            sink.write(chunk)
        except OSError as exc:
            raise ArtifactWriteError(
                f"cannot write {path or 'the output'}: {exc.strerror}"
            ) from exc
        copied += len(chunk)


def _fsync(sink: BinaryIO, path: Path) -> None:
    try:
        sink.flush()
        os.fsync(sink.fileno())
    except OSError as exc:
        raise ArtifactWriteError(f"cannot write {path}: {exc.strerror}") from exc
