"""sha256 of served files: from the job's manifest.json while a file is unchanged since the
manifest was written, else computed once and cached by (file, size, mtime)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

from model_trainer.artifacts import MANIFEST_NAME

_BLOCK = 1 << 20
_SHA256_HEX = frozenset("0123456789abcdef")

# (device, inode, size, mtime_ns) identifies one version of a file's content.
FileVersion = tuple[int, int, int, int]


def version_of(st: os.stat_result) -> FileVersion:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def sha256_prefix(path: Path, size: int) -> str:
    """sha256 of the first `size` bytes: the bytes a response of that length sends, even while
    the file grows (logs.jsonl)."""
    digest = hashlib.sha256()
    remaining = size
    with path.open("rb") as handle:
        while remaining > 0:
            block = handle.read(min(_BLOCK, remaining))
            if not block:
                raise OSError(f"{path.name} shrank while it was read")
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _SHA256_HEX


class DigestCache:
    """Thread-safe, bounded cache of file digests and of each job's manifest digests."""

    def __init__(self, max_entries: int = 20_000) -> None:
        self._max_entries = max_entries
        self._files: OrderedDict[FileVersion, str] = OrderedDict()
        self._manifests: dict[Path, tuple[FileVersion, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def known(self, job_dir: Path, rel: str, st: os.stat_result) -> str | None:
        """The digest if the manifest or the cache has it, without reading the file."""
        from_manifest = self._from_manifest(job_dir, rel, st)
        if from_manifest is not None:
            return from_manifest
        with self._lock:
            digest = self._files.get(version_of(st))
            if digest is not None:
                self._files.move_to_end(version_of(st))
            return digest

    def sha256(self, job_dir: Path, rel: str, path: Path, st: os.stat_result) -> str:
        """The digest of the first st.st_size bytes of `path` (`rel` inside `job_dir`)."""
        digest = self.known(job_dir, rel, st)
        if digest is not None:
            return digest
        digest = sha256_prefix(path, st.st_size)
        try:
            unchanged = version_of(path.stat()) == version_of(st)
        except OSError:
            unchanged = False
        if unchanged:  # a file that changed meanwhile would poison the cache
            with self._lock:
                self._files[version_of(st)] = digest
                while len(self._files) > self._max_entries:
                    self._files.popitem(last=False)
        return digest

    def _from_manifest(self, job_dir: Path, rel: str, st: os.stat_result) -> str | None:
        manifest = job_dir / MANIFEST_NAME
        try:
            manifest_st = manifest.stat()
        except OSError:
            return None
        # Files are written before the manifest; one modified since is not what it lists.
        if st.st_mtime_ns > manifest_st.st_mtime_ns:
            return None
        return self._manifest_files(manifest, manifest_st).get(rel)

    def _manifest_files(self, manifest: Path, st: os.stat_result) -> dict[str, str]:
        version = version_of(st)
        with self._lock:
            cached = self._manifests.get(manifest)
        if cached is not None and cached[0] == version:
            return cached[1]
        files: dict[str, str] = {}
        try:
            listed = json.loads(manifest.read_bytes()).get("files")
        except (OSError, ValueError, AttributeError):
            listed = None
        if isinstance(listed, dict):
            files = {k: v for k, v in listed.items() if isinstance(k, str) and _is_sha256(v)}
        with self._lock:
            self._manifests[manifest] = (version, files)
        return files
