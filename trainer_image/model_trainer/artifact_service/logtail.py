"""The end of a job's logs.jsonl, read backwards from the end, and a follower that returns the
lines appended since, through truncation and replacement of the file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_BLOCK = 1 << 16
# One poll returns at most this much; a line longer than this is cut into pieces.
MAX_READ = 1 << 20


def tail_start(handle: BinaryIO, end: int, lines: int) -> int:
    """Offset where the last `lines` lines of the first `end` bytes begin. A final line without
    its newline counts as a line."""
    if lines <= 0:
        return end
    # A newline at end - 1 ends the last line; the lines start after the newlines before it.
    pos = end - 1
    found = 0
    while pos > 0:
        start = max(0, pos - _BLOCK)
        handle.seek(start)
        block = handle.read(pos - start)
        index = len(block)
        while True:
            index = block.rfind(b"\n", 0, index)
            if index < 0:
                break
            found += 1
            if found == lines:
                return start + index + 1
        pos = start
    return 0


class LogFollower:
    """Complete lines of a growing file from `offset` on. Each line comes with the offset just
    past it, which a client sends back (SSE Last-Event-ID) to resume. `locate` returns the
    file's path each time, or None while it is absent (or not one the caller may read)."""

    def __init__(self, locate: Callable[[], Path | None], offset: int) -> None:
        self._locate = locate
        self.offset = offset
        self._handle: BinaryIO | None = None
        self._identity: tuple[int, int] | None = None
        self.truncated = False

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None

    def poll(self) -> list[tuple[int, bytes]]:
        """The complete lines appended since the last poll (at most MAX_READ bytes of them)."""
        self.truncated = False
        path = self._locate()
        try:
            if path is None:
                raise FileNotFoundError
            st = path.stat()
        except OSError:
            return self._drain_and_close()
        identity = (st.st_dev, st.st_ino)
        if self._handle is not None and identity != self._identity:
            # Replaced (rotated or rewritten by rename): finish the old file, then start the new.
            lines = self._drain_and_close()
            if lines:
                return lines
        if self._handle is None:
            try:
                self._handle = path.open("rb")
            except OSError:
                return []
            first_open = self._identity is None
            fst = os.fstat(self._handle.fileno())
            self._identity = (fst.st_dev, fst.st_ino)
            if not first_open:
                self.offset = 0
        return self._read_lines()

    def _drain_and_close(self) -> list[tuple[int, bytes]]:
        lines = self._read_lines() if self._handle is not None else []
        if not lines:
            self.close()
        return lines

    def _read_lines(self) -> list[tuple[int, bytes]]:
        handle = self._handle
        if handle is None:
            return []
        size = os.fstat(handle.fileno()).st_size
        if size < self.offset:
            self.offset = 0
            self.truncated = True
        if size == self.offset:
            return []
        handle.seek(self.offset)
        data = handle.read(min(MAX_READ, size - self.offset))
        last_newline = data.rfind(b"\n")
        if last_newline < 0:
            if len(data) < MAX_READ:
                return []  # a line still being written
            last_newline = len(data) - 1
        lines: list[tuple[int, bytes]] = []
        pos = 0
        while pos <= last_newline:
            newline = data.find(b"\n", pos, last_newline + 1)
            stop = last_newline + 1 if newline < 0 else newline + 1
            lines.append((self.offset + stop, data[pos:stop].rstrip(b"\r\n")))
            pos = stop
        self.offset += last_newline + 1
        return lines
