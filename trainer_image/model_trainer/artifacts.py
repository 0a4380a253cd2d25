"""Artifact layout and crash-safe writes: tmp file, fsync, rename. A half-written file never
carries the final name, and a full disk becomes an ArtifactWriteError."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pydantic import JsonValue

from model_trainer.errors import ArtifactWriteError

MANIFEST_NAME = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
LOGS_NAME = "logs.jsonl"
CHECKPOINTS_DIR = "checkpoints"
# Not hashed into the manifest: the manifest itself, the log that keeps growing after it,
# and checkpoints, which carry their own digests.
_UNHASHED = {MANIFEST_NAME, LOGS_NAME}

KIND_DIRS = {"TokenizerJob": "tokenizerjobs", "TrainingRun": "trainingruns"}
# A finished TrainingRun's model, as from_pretrained loads it.
MODEL_FILES = ("config.json", "model.safetensors")


def evaluation_metrics_path(name: str) -> str:
    """The metrics of spec.evaluations entry `name`, relative to the run's directory."""
    return f"eval/{name}/metrics.json"


def job_dir(root: Path, namespace: str, kind: str, name: str) -> Path:
    """Outputs of one job: <root>/<namespace>/<tokenizerjobs|trainingruns>/<name>."""
    return root / namespace / KIND_DIRS[kind] / name


def is_being_written(name: str) -> bool:
    """A file or checkpoint directory under its temporary name (`.<name>.<random>.tmp`), before
    the rename that publishes it."""
    return name.startswith(".") and name.endswith(".tmp")


def write_error(path: Path, exc: OSError) -> ArtifactWriteError:
    """The user-facing error for a failed write to the artifacts volume."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ArtifactWriteError(f"disk full while writing {path}")
    if exc.errno == errno.EFBIG:
        return ArtifactWriteError(f"file size limit reached while writing {path}")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ArtifactWriteError(f"artifacts volume refused to write {path}: {exc.strerror}")
    return ArtifactWriteError(f"could not write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block succeeds it is fsynced and renamed
    to `path`. On any error the temporary file is removed and `path` is untouched."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def canonical_json(value: JsonValue) -> str:
    """Stable JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path: Path, value: JsonValue) -> None:
    atomic_write_bytes(path, canonical_json(value).encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_files(directory: Path) -> list[str]:
    """POSIX relative paths of the job's output files: not checkpoints, hidden files, the
    manifest or the log."""
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if not path.is_file() or rel.parts[0] == CHECKPOINTS_DIR or path.name.startswith("."):
            continue
        if rel.as_posix() not in _UNHASHED:
            files.append(rel.as_posix())
    return files


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every output file under `directory`, keyed by POSIX relative path."""
    return {rel: sha256_file(directory / rel) for rel in output_files(directory)}


def write_manifest(directory: Path, manifest: dict[str, JsonValue]) -> str:
    """Write manifest.json with the digest of every output file; return the manifest's sha256."""
    body: dict[str, JsonValue] = dict(manifest)
    files: dict[str, JsonValue] = dict(file_digests(directory).items())
    body["files"] = files
    data = canonical_json(body).encode("utf-8")
    atomic_write_bytes(directory / MANIFEST_NAME, data)
    return sha256_bytes(data)


def retire_manifest(directory: Path) -> None:
    """Remove a manifest left by an earlier run, so that a failure now is never presented as
    that run's good result."""
    try:
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(directory / MANIFEST_NAME, exc) from exc
