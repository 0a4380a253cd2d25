"""How a running job tells the world about itself.

Training code talks to a `Reporter` only. Local mode combines a terminal bar (or periodic log
lines) with, optionally, the Redis reporter of `model_trainer.redis_reporter`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Protocol

from model_trainer.api.common import ArtifactsStatus, EvalMetrics, Phase, Progress
from model_trainer.api.tokenizer_job import TokenizerStats


class Reporter(Protocol):
    def phase(self, phase: Phase, message: str = "", reason: str = "") -> None:
        """The job entered `phase`. Finished phases are reported exactly once, last."""

    def progress(self, progress: Progress) -> None:
        """Latest progress; called often, must be cheap and never block on I/O."""

    def eval(self, metrics: EvalMetrics) -> None:
        """A holdout evaluation finished."""

    def stats(self, stats: TokenizerStats) -> None:
        """A TokenizerJob's holdout statistics; reported once, before Succeeded."""

    def artifacts(self, artifacts: ArtifactsStatus) -> None:
        """Where the outputs are, and the manifest digest once it exists."""

    def cancel_requested(self) -> bool:
        """True once the job should stop; checked at least once per step. Never blocks."""

    def close(self) -> None:
        """Flush what is pending and release resources."""


class CancelToken:
    """A cancellation flag that SIGTERM and SIGINT set, as kubelet does on pod deletion."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def _handler(_signum: int, _frame: FrameType | None) -> None:
            self._event.set()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)


class NullReporter:
    """Reports nothing; cancellation comes only from its token."""

    def __init__(self, token: CancelToken | None = None) -> None:
        self.token = token or CancelToken()

    def phase(self, phase: Phase, message: str = "", reason: str = "") -> None:
        pass

    def progress(self, progress: Progress) -> None:
        pass

    def eval(self, metrics: EvalMetrics) -> None:
        pass

    def stats(self, stats: TokenizerStats) -> None:
        pass

    def artifacts(self, artifacts: ArtifactsStatus) -> None:
        pass

    def cancel_requested(self) -> bool:
        return self.token.is_set()

    def close(self) -> None:
        pass


class MultiReporter:
    """Fans every report out; cancellation is requested if any member requests it."""

    def __init__(self, members: Sequence[Reporter]) -> None:
        self.members = list(members)

    def phase(self, phase: Phase, message: str = "", reason: str = "") -> None:
        for member in self.members:
            member.phase(phase, message, reason)

    def progress(self, progress: Progress) -> None:
        for member in self.members:
            member.progress(progress)

    def eval(self, metrics: EvalMetrics) -> None:
        for member in self.members:
            member.eval(metrics)

    def stats(self, stats: TokenizerStats) -> None:
        for member in self.members:
            member.stats(stats)

    def artifacts(self, artifacts: ArtifactsStatus) -> None:
        for member in self.members:
            member.artifacts(artifacts)

    def cancel_requested(self) -> bool:
        return any(member.cancel_requested() for member in self.members)

    def close(self) -> None:
        for member in self.members:
            member.close()
