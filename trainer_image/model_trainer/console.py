"""Progress on a terminal: a tqdm bar per job. Off a terminal the trainers' log lines suffice."""

from __future__ import annotations

import sys
from typing import Never

from tqdm import tqdm

from model_trainer import log
from model_trainer.api.common import ArtifactsStatus, EvalMetrics, Phase, Progress
from model_trainer.api.tokenizer_job import TokenizerStats


class ConsoleReporter:
    def __init__(self, label: str, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: tqdm[Never] | None = None

    def phase(self, phase: Phase, message: str = "", reason: str = "") -> None:
        if phase.finished and self._bar is not None:
            self._bar.set_postfix_str(phase.value)
            self.close()

    def progress(self, progress: Progress) -> None:
        if not self.enabled or progress.total_steps <= 0:
            return
        bar = self._bar
        if bar is None:
            log.set_console_writer(_write_above_bars)
            bar = self._bar = tqdm(
                total=progress.total_steps,
                desc=self.label,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        bar.n = progress.step
        postfix = {}
        if progress.loss is not None:
            postfix["loss"] = f"{progress.loss:.3f}"
        if progress.tokens_per_second is not None:
            postfix["tok/s"] = f"{progress.tokens_per_second:,.0f}"
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    def eval(self, metrics: EvalMetrics) -> None:
        if self._bar is not None:
            self._bar.write(
                f"{self.label} eval @ step {metrics.step}: loss {metrics.loss:.4f}, "
                f"ppl {metrics.perplexity:.2f}, bits/byte {metrics.bits_per_byte:.4f}",
                file=sys.stderr,
            )

    def stats(self, stats: TokenizerStats) -> None:
        pass  # the summary shows them once the job is done

    def artifacts(self, artifacts: ArtifactsStatus) -> None:
        pass

    def cancel_requested(self) -> bool:
        return False

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        log.set_console_writer(None)


def _write_above_bars(line: str) -> None:
    tqdm.write(line, file=sys.stderr)
