"""Bearer-token auth from a token file, re-read whenever the file changes, as a mounted Secret
does when it rotates (the kubelet swaps a symlink, so the file's inode changes)."""

from __future__ import annotations

import hmac
import threading
from pathlib import Path

from model_trainer import log
from model_trainer.errors import InvalidInputError

logger = log.get_logger(__name__)


class TokenFile:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._version: tuple[int, int, int, int] | None = None
        self._token: bytes | None = None
        try:
            self._refresh()
        except OSError as exc:
            raise InvalidInputError(f"cannot read the token file {path}: {exc.strerror}") from exc
        if self._token is None:
            raise InvalidInputError(f"the token file {path} is empty")

    def _refresh(self) -> None:
        st = self._path.stat()
        version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if version == self._version:
            return
        token = self._path.read_bytes().strip()
        if self._version is not None:
            logger.info("token_file_reloaded", empty=not token)
        self._version = version
        # An emptied file locks everyone out rather than letting everyone in.
        self._token = token or None

    def _current(self) -> bytes | None:
        with self._lock:
            try:
                self._refresh()
            except OSError:
                if self._version is not None:
                    logger.warning("token_file_unreadable")
                self._version, self._token = None, None
            return self._token

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header carries the current token."""
        token = self._current()
        if token is None or authorization is None:
            return False
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode("utf-8", "replace"), token)
