"""Resolve a CorpusSource to text, and split off the holdout."""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from model_trainer.api.common import CorpusSource
from model_trainer.errors import CorpusError

DOWNLOAD_CHUNK_BYTES = 1 << 20
DOWNLOAD_ATTEMPTS = 5


@dataclass(frozen=True)
class CorpusContext:
    """Where corpus references point in the current mode."""

    artifacts_root: Path
    """Relative `path` sources resolve against this (the artifacts volume in a pod)."""
    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """ConfigMap data by name: from the YAML files in local mode, from the mount in a pod."""
    config_map_dir: Path | None = None
    """In a pod, ConfigMaps are mounted as <config_map_dir>/<name>/<key>."""
    download_dir: Path | None = None
    """Cache of url downloads; defaults to <artifacts_root>/.cache/downloads."""
    allow_absolute_paths: bool = True
    """Local mode reads absolute paths as they are; a pod keeps every path inside the volume."""


@dataclass(frozen=True)
class Corpus:
    text: str
    sha256: str
    n_bytes: int
    source: str


@dataclass(frozen=True)
class Split:
    train: str
    holdout: str

    @property
    def holdout_bytes(self) -> int:
        return len(self.holdout.encode("utf-8"))


def load_corpus(source: CorpusSource, ctx: CorpusContext) -> Corpus:
    if source.path is not None:
        data = _read_path(source.path, ctx)
    elif source.config_map_ref is not None:
        data = _read_config_map(source.config_map_ref.name, source.config_map_ref.key, ctx)
    elif source.url is not None and source.sha256 is not None:
        data = _download(source.url, source.sha256, ctx)
    else:  # the model validator makes this unreachable; keep the message honest anyway
        raise CorpusError("corpus has no source")
    text = _decode_utf8(data, source.describe())
    if not text.strip():
        raise CorpusError(f"corpus {source.describe()} is empty")
    return Corpus(
        text=text,
        sha256=hashlib.sha256(data).hexdigest(),
        n_bytes=len(data),
        source=source.describe(),
    )


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CorpusError(
            f"corpus {where} is not UTF-8: invalid byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start} (line {line})"
        ) from None


def _resolve_path(raw: str, ctx: CorpusContext) -> Path:
    candidate = Path(raw)
    if candidate.is_absolute() and ctx.allow_absolute_paths:
        return candidate
    root = ctx.artifacts_root.resolve()
    resolved = (root / raw.lstrip("/")).resolve()
    if resolved != root and root not in resolved.parents:
        raise CorpusError(f"corpus path {raw!r} leaves the artifacts volume")
    return resolved


def _read_path(raw: str, ctx: CorpusContext) -> bytes:
    path = _resolve_path(raw, ctx)
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise CorpusError(f"corpus directory {path} holds no files")
        chunks = []
        for file in files:
            data = _read_file(file)
            _decode_utf8(data, str(file))
            chunks.append(data if data.endswith(b"\n") else data + b"\n")
        return b"".join(chunks)
    raise CorpusError(f"corpus path {path} does not exist")


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror}") from None


def _read_config_map(name: str, key: str | None, ctx: CorpusContext) -> bytes:
    data: Mapping[str, str] | None = ctx.config_maps.get(name)
    if data is None and ctx.config_map_dir is not None:
        mount = ctx.config_map_dir / name
        if mount.is_dir():
            data = {
                p.name: _read_file(p).decode("utf-8", errors="strict")
                for p in sorted(mount.iterdir())
                if p.is_file() and not p.name.startswith(".")
            }
    if data is None:
        raise CorpusError(f"ConfigMap {name!r} not found")
    if key is not None:
        if key not in data:
            raise CorpusError(f"ConfigMap {name!r} has no key {key!r}")
        return data[key].encode("utf-8")
    return "".join(v if v.endswith("\n") else v + "\n" for _, v in sorted(data.items())).encode(
        "utf-8"
    )


def _download(url: str, sha256: str, ctx: CorpusContext) -> bytes:
    """Download `url` into the cache, resuming a partial file with HTTP Range requests, and
    check the sha256 of the whole."""
    cache = ctx.download_dir or ctx.artifacts_root / ".cache" / "downloads"
    final = cache / sha256
    if final.is_file():
        data = final.read_bytes()
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
        final.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{sha256}.part"
    last_error = ""
    for _attempt in range(DOWNLOAD_ATTEMPTS):
        offset = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url)
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = response.status
                if offset and status != 206:
                    offset = 0  # the server ignored the range: start over
                expected = response.headers.get("Content-Length")
                received = 0
                with partial.open("ab" if offset else "wb") as out:
                    while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                        out.write(chunk)
                        received += len(chunk)
                # http.client returns a short body without an error when the peer closes early
                if expected is not None and received < int(expected):
                    raise ConnectionError(f"connection closed after {received} of {expected} bytes")
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                break  # the partial file is already whole
            if 400 <= exc.code < 500:
                raise CorpusError(f"download of {url} failed: HTTP {exc.code}") from None
            last_error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
            last_error = str(exc)
    else:
        raise CorpusError(
            f"download of {url} failed after {DOWNLOAD_ATTEMPTS} attempts: {last_error}"
        )
    data = partial.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        partial.unlink()
        raise CorpusError(f"download of {url} has sha256 {digest}, expected {sha256}")
    partial.replace(final)
    return data


def split_holdout(text: str, fraction: float) -> Split:
    """The holdout is the last `fraction` of the text, cut at the next line boundary."""
    if fraction <= 0:
        return Split(train=text, holdout="")
    cut = int(len(text) * (1.0 - fraction))
    newline = text.find("\n", cut)
    boundary = len(text) if newline < 0 else newline + 1
    if boundary >= len(text):
        previous = text.rfind("\n", 0, cut)
        boundary = previous + 1 if previous >= 0 else 0
    train, holdout = text[:boundary], text[boundary:]
    if not train.strip() or not holdout.strip():
        raise CorpusError(
            f"corpus is too small to split off a holdout of {fraction:.0%} at a line boundary "
            f"({len(text)} characters, {text.count(chr(10))} lines)"
        )
    return Split(train=train, holdout=holdout)
