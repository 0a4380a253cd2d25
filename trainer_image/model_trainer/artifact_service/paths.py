"""Request paths to files on the artifacts volume, with every way out of a job's directory shut:
names are Kubernetes names, kinds come from a fixed set, each path segment is percent-decoded
once and rejected if it could climb, and the resolved target must stay inside the job directory.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from urllib.parse import unquote

from model_trainer.artifacts import KIND_DIRS

# Kubernetes' own rules: namespaces are DNS-1123 labels, resource names DNS-1123 subdomains.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

KIND_DIR_NAMES = frozenset(KIND_DIRS.values())
# URL kind -> directory: plural (the directory's own name) and singular.
URL_KINDS = {**{d: d for d in KIND_DIR_NAMES}, **{d.removesuffix("s"): d for d in KIND_DIR_NAMES}}


class RequestError(Exception):
    """A request the service answers with an HTTP error status and a JSON message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_segment(raw: str) -> str:
    """Percent-decode one path segment, exactly once."""
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError as exc:
        raise RequestError(400, "path is not valid UTF-8") from exc


def namespace_segment(raw: str) -> str:
    namespace = decode_segment(raw)
    if len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace):
        raise RequestError(400, "invalid namespace")
    return namespace


def name_segment(raw: str) -> str:
    name = decode_segment(raw)
    if not is_valid_name(name):
        raise RequestError(400, "invalid name")
    return name


def kind_segment(raw: str) -> str:
    """The directory name of a URL kind (`trainingruns` or `trainingrun` -> `trainingruns`)."""
    kind = URL_KINDS.get(decode_segment(raw))
    if kind is None:
        raise RequestError(400, f"invalid kind: use one of {', '.join(sorted(URL_KINDS))}")
    return kind


def file_segments(raw_segments: list[str]) -> list[str]:
    """The decoded segments of a relative file path; anything that could leave the directory
    (`..`, an empty or absolute segment, an encoded slash or backslash, NUL) is refused."""
    if not raw_segments:
        raise RequestError(400, "empty file path")
    segments = [decode_segment(raw) for raw in raw_segments]
    for segment in segments:
        if segment in ("", ".", "..") or any(c in segment for c in "/\\\0"):
            raise RequestError(400, "invalid file path")
    return segments


def _strictly_inside(path: Path, directory: Path) -> bool:
    return path != directory and path.is_relative_to(directory)


def job_directory(root: Path, namespace: str, kind_dir: str, name: str) -> Path:
    """The real path of an existing job directory, never outside the real root."""
    real_root = root.resolve()
    real = (real_root / namespace / kind_dir / name).resolve()
    if not _strictly_inside(real, real_root) or not real.is_dir():
        raise RequestError(404, "no artifacts for this job")
    return real


def kind_directory(root: Path, namespace: str, kind_dir: str) -> Path | None:
    """The real path of `<root>/<namespace>/<kind_dir>`, or None where there is none."""
    real_root = root.resolve()
    real = (real_root / namespace / kind_dir).resolve()
    return real if _strictly_inside(real, real_root) and real.is_dir() else None


def inside_job(job_dir: Path, candidate: Path) -> Path | None:
    """The real path of `candidate` if it is a regular file inside `job_dir` (which is real)."""
    real = candidate.resolve()
    if not _strictly_inside(real, job_dir):
        return None
    try:
        mode = real.stat().st_mode
    except OSError:
        return None
    return real if stat.S_ISREG(mode) else None


def job_file(job_dir: Path, segments: list[str]) -> Path:
    """The real path of a regular file inside `job_dir`; a directory, a missing file or a
    symlink that leads out of the job directory are all 'not found'."""
    real = inside_job(job_dir, job_dir.joinpath(*segments))
    if real is None:
        raise RequestError(404, "no such file")
    return real


def is_valid_name(name: str) -> bool:
    return len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name) is not None
