"""Structured JSON logging with structlog, teed into each job's logs.jsonl."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

_sinks: list[IO[str]] = []
_sinks_lock = threading.Lock()
_write_lock = threading.Lock()
# Set while a progress bar owns the terminal: log lines go through it, and the events the bar
# already shows stay off the terminal (they still reach logs.jsonl).
_console_writer: Callable[[str], None] | None = None
QUIET_ON_CONSOLE = frozenset({"train_progress"})


def _tee_to_job_logs(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    if _sinks:
        line = json.dumps(event_dict, default=str, sort_keys=True) + "\n"
        with _sinks_lock:
            for sink in list(_sinks):
                try:
                    sink.write(line)
                    sink.flush()
                except OSError:
                    # A full disk must not turn logging into the failure; stderr still has it.
                    _sinks.remove(sink)
    return event_dict


def _quiet_on_console(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    if _console_writer is not None and event_dict.get("event") in QUIET_ON_CONSOLE:
        raise structlog.DropEvent
    return event_dict


def set_console_writer(writer: Callable[[str], None] | None) -> None:
    """Route terminal log lines through `writer` (a progress bar's write), or back to stderr."""
    global _console_writer
    _console_writer = writer


class _LineLogger:
    """Writes each rendered line to `stream`, or to whatever sys.stderr is at write time, so that
    a swapped stream (pytest's capture, a redirect) never leaves it writing to a closed file."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        writer = _console_writer
        if self._stream is None and writer is not None:
            writer(message)
            return
        stream = self._stream or sys.stderr
        with _write_lock:
            stream.write(message + "\n")
            stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Send log lines to `stream` (stderr by default) and JSON lines to every open job log.

    The lines are JSON, except on an interactive terminal, where they are rendered for people."""
    interactive = stream is None and sys.stderr.isatty()
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=True, sort_keys=True)
        if interactive
        else structlog.processors.JSONRenderer(default=str, sort_keys=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            _tee_to_job_logs,
            _quiet_on_console,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_args: _LineLogger(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> FilteringBoundLogger:
    # Lazy: the logger picks up configure() even when created at import time.
    logger: FilteringBoundLogger = structlog.get_logger(logger_name=name)
    return logger


@contextlib.contextmanager
def job_log(path: Path) -> Iterator[None]:
    """Append every log event to `path` (JSON lines) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = path.open("a", encoding="utf-8")
    with _sinks_lock:
        _sinks.append(sink)
    try:
        yield
    finally:
        with _sinks_lock:
            if sink in _sinks:
                _sinks.remove(sink)
        with contextlib.suppress(OSError):
            sink.close()


@contextlib.contextmanager
def bound(**values: str) -> Iterator[None]:
    """Bind context (job kind, name, uid) to every log line inside the block."""
    with structlog.contextvars.bound_contextvars(**values):
        yield
