"""train_model: a TrainingRun from corpus and tokenizer to model, metrics, samples and manifest,
resumable from checkpoints and cancellable at any step."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NoReturn

import torch
from pydantic import JsonValue
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from model_trainer import artifacts, log
from model_trainer.api.common import API_VERSION, ArtifactsStatus, EvalMetrics
from model_trainer.api.training_run import TrainingRun, TrainingRunSpec
from model_trainer.corpus import Corpus, CorpusContext, Split, load_corpus, split_holdout
from model_trainer.errors import CheckpointError, InvalidInputError, JobCancelled
from model_trainer.lm import checkpoint, outputs
from model_trainer.lm.data import EvalSet, WindowSampler, eval_set, train_stream
from model_trainer.lm.device import Runtime, decide_compile, detect_runtime
from model_trainer.lm.evaluate import evaluate_set
from model_trainer.lm.model import (
    build_config,
    build_model,
    move_to,
    special_tokens,
)
from model_trainer.lm.optim import build_optimizer
from model_trainer.lm.progress import ProgressTracker
from model_trainer.lm.samples import generate_samples
from model_trainer.lm.schedule import learning_rate_at
from model_trainer.lm.step import StepRunner
from model_trainer.reporting import Reporter
from model_trainer.tokenizer import load_tokenizer

logger = log.get_logger(__name__)

# Spec fields that do not change the trajectory of the weights: a checkpoint stays usable
# when they change. (precision may change when a pod lands on a different node.)
_TRAJECTORY_NEUTRAL = {"eval_every", "checkpoint_every", "precision"}


@dataclass(frozen=True)
class TrainResult:
    final_eval: EvalMetrics
    steps: int
    manifest_sha256: str
    duration_seconds: float
    resumed_from_step: int | None


def run_fingerprint(spec: TrainingRunSpec, corpus_sha256: str, tokenizer_sha256: str) -> str:
    """Digest of everything a checkpoint's weights depend on."""
    body: dict[str, JsonValue] = {
        "model": spec.model.model_dump(mode="json", by_alias=True),
        "training": spec.training.model_dump(
            mode="json", by_alias=True, exclude=_TRAJECTORY_NEUTRAL
        ),
        "holdoutFraction": spec.holdout_fraction,
        "corpus": corpus_sha256,
        "tokenizer": tokenizer_sha256,
    }
    return artifacts.sha256_bytes(artifacts.canonical_json(body).encode("utf-8"))


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class _Session:
    """The live objects a checkpoint restores into."""

    model: GPT2LMHeadModel
    optimizer: torch.optim.AdamW
    sampler: WindowSampler


@dataclass(frozen=True)
class _Inputs:
    run: TrainingRun
    out_dir: Path
    tokenizer_path: Path
    tokenizer: Tokenizer
    tokenizer_sha256: str
    corpus: Corpus
    split: Split
    train_tokens: torch.Tensor
    holdout: EvalSet
    config: GPT2Config
    fingerprint: str


def _prepare(run: TrainingRun, out_dir: Path, tokenizer_path: Path, ctx: CorpusContext) -> _Inputs:
    spec = run.spec
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer_sha256 = artifacts.sha256_file(tokenizer_path)
    corpus = load_corpus(spec.corpus, ctx)
    split = split_holdout(corpus.text, spec.holdout_fraction)
    train_tokens = train_stream(tokenizer, split.train, spec.model.context_length)
    holdout = eval_set(tokenizer, split.holdout, spec.evaluation.max_tokens)
    logger.info(
        "data_ready",
        corpus=corpus.source,
        train_bytes=len(split.train.encode("utf-8")),
        holdout_bytes=split.holdout_bytes,
        train_tokens=train_tokens.numel(),
        eval_tokens=holdout.tokens.numel(),
    )
    return _Inputs(
        run=run,
        out_dir=out_dir,
        tokenizer_path=tokenizer_path,
        tokenizer=tokenizer,
        tokenizer_sha256=tokenizer_sha256,
        corpus=corpus,
        split=split,
        train_tokens=train_tokens,
        holdout=holdout,
        config=build_config(spec.model, tokenizer),
        fingerprint=run_fingerprint(spec, corpus.sha256, tokenizer_sha256),
    )


def _new_session(inputs: _Inputs, runtime: Runtime) -> _Session:
    training = inputs.run.spec.training
    random.seed(training.seed)
    model = build_model(inputs.config, training.seed)
    move_to(model, runtime.device)
    model.train()
    sampler = WindowSampler(
        inputs.train_tokens, inputs.run.spec.model.context_length + 1, training.seed
    )
    return _Session(model, build_optimizer(model, training), sampler)


def _resume(
    inputs: _Inputs, runtime: Runtime
) -> tuple[_Session, checkpoint.TrainerState, int | None]:
    """Restore the newest valid checkpoint; quarantine each one that fails; else start fresh."""
    session = _new_session(inputs, runtime)
    failed = 0
    for path in checkpoint.candidates(inputs.out_dir / artifacts.CHECKPOINTS_DIR):
        try:
            loaded = checkpoint.read_checkpoint(path, inputs.fingerprint)
            state = checkpoint.restore(
                loaded,
                model=session.model,
                optimizer=session.optimizer,
                data_generator=session.sampler.generator,
            )
        except CheckpointError as exc:
            checkpoint.quarantine(path, exc)
            failed += 1
            session = _new_session(inputs, runtime)  # a failed restore may have half-loaded
            continue
        logger.info("resumed_from_checkpoint", step=state.step, path=str(path))
        return session, state, state.step
    if failed:
        logger.warning("no_valid_checkpoint_starting_fresh", unusable=failed)
    return session, checkpoint.TrainerState(step=0), None


class _Run:
    """One invocation of train_model: the loop, evaluation, checkpoints and outputs."""

    def __init__(
        self,
        inputs: _Inputs,
        reporter: Reporter,
        *,
        started_at: str,
        started: float,
        artifacts_root: Path,
    ) -> None:
        self.inputs = inputs
        self.artifacts_root = artifacts_root.resolve()
        self.reporter = reporter
        self.started_at = started_at
        self.started = started
        spec = inputs.run.spec
        self.training = spec.training
        self.runtime = detect_runtime(self.training.precision)
        self.session, state, self.resumed_from = _resume(inputs, self.runtime)
        self.step = state.step
        self.tokens_seen = state.tokens_seen
        self.history = list(state.eval_history)
        self.checkpointed_step: int | None = self.resumed_from
        self.tokens_per_step = (
            self.training.batch_size
            * self.training.gradient_accumulation
            * spec.model.context_length
        )
        self.tracker = ProgressTracker(
            total_steps=self.training.max_steps,
            tokens_per_step=self.tokens_per_step,
            start_step=self.step,
            smoothed_loss=state.smoothed_loss,
        )
        compile_choice = decide_compile(self.training.max_steps - self.step, self.runtime.device)
        self.runner = StepRunner(
            self.session.model,
            self.session.optimizer,
            self.session.sampler,
            self.training,
            self.runtime,
            compile=compile_choice.enabled,
        )
        self.special = special_tokens(inputs.tokenizer)

    @property
    def checkpoint_dir(self) -> Path:
        return self.inputs.out_dir / artifacts.CHECKPOINTS_DIR

    def train(self) -> TrainResult:
        logger.info(
            "training_started",
            step=self.step,
            max_steps=self.training.max_steps,
            resumed_from_step=self.resumed_from,
            parameters=sum(p.numel() for p in self.session.model.parameters()),
        )
        while self.step < self.training.max_steps:
            if self.reporter.cancel_requested():
                self._cancel()
            self._one_step()
        final = self._final_eval()
        self._checkpoint()
        sha = self._write_outputs("succeeded", final, with_samples=True)
        duration = time.monotonic() - self.started
        logger.info(
            "training_finished",
            steps=self.step,
            loss=final.loss,
            bits_per_byte=final.bits_per_byte,
            duration_seconds=round(duration, 3),
        )
        return TrainResult(final, self.step, sha, duration, self.resumed_from)

    def _one_step(self) -> None:
        rng_before = checkpoint.capture_rng(self.session.sampler.generator)
        began = time.perf_counter()
        loss = self.runner.step(self.step, self.reporter.cancel_requested)
        if loss is None:
            checkpoint.restore_rng(rng_before, self.session.sampler.generator)
            self._cancel()
        if not math.isfinite(loss):
            raise InvalidInputError(
                f"training diverged: the loss is {loss} at step {self.step + 1}; "
                "lower learningRate or raise warmupSteps"
            )
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        progress = self.tracker.update(self.step, loss, time.perf_counter() - began)
        self.reporter.progress(progress)
        if self.tracker.should_log():
            logger.info(
                "train_progress",
                step=self.step,
                total_steps=self.training.max_steps,
                percent=progress.percent,
                loss=round(progress.loss or loss, 4),
                lr=learning_rate_at(self.step - 1, self.training),
                tokens_per_second=round(progress.tokens_per_second or 0.0, 1),
                eta_seconds=round(progress.eta_seconds or 0.0, 1),
            )
        last = self.step == self.training.max_steps
        if last or self.step % self.training.eval_every == 0:
            self._evaluate()
        if last or self.step % self.training.checkpoint_every == 0:
            self._checkpoint()

    def _evaluate(self) -> EvalMetrics:
        began = time.perf_counter()
        metrics = evaluate_set(
            self.session.model,
            self.inputs.holdout,
            batch_size=self.training.batch_size,
            pad_id=self.special.pad_id,
            device=self.runtime.device,
            step=self.step,
        )
        self.history.append(metrics)
        self.reporter.eval(metrics)
        logger.info(
            "eval",
            step=self.step,
            loss=round(metrics.loss, 5),
            perplexity=round(metrics.perplexity, 3),
            bits_per_byte=round(metrics.bits_per_byte, 5),
            tokens=metrics.tokens,
            seconds=round(time.perf_counter() - began, 3),
        )
        return metrics

    def _final_eval(self) -> EvalMetrics:
        if self.history and self.history[-1].step == self.step:
            return self.history[-1]
        return self._evaluate()

    def _checkpoint(self) -> None:
        if self.checkpointed_step == self.step:
            return
        checkpoint.save_checkpoint(
            self.checkpoint_dir,
            model=self.session.model,
            optimizer=self.session.optimizer,
            rng=checkpoint.capture_rng(self.session.sampler.generator),
            state=checkpoint.TrainerState(
                step=self.step,
                smoothed_loss=self.tracker.smoothed_loss,
                tokens_seen=self.tokens_seen,
                eval_history=tuple(self.history),
            ),
            fingerprint=self.inputs.fingerprint,
        )
        self.checkpointed_step = self.step

    def _cancel(self) -> NoReturn:
        logger.info("training_cancelled", step=self.step)
        self._checkpoint()
        final = self.history[-1] if self.history else None
        self._write_outputs("cancelled", final, with_samples=False)
        raise JobCancelled(f"cancelled at step {self.step} of {self.training.max_steps}")

    def _write_outputs(
        self,
        status: Literal["succeeded", "cancelled"],
        final: EvalMetrics | None,
        *,
        with_samples: bool,
    ) -> str:
        out_dir = self.inputs.out_dir
        spec = self.inputs.run.spec
        outputs.save_model(self.session.model, out_dir, self.inputs.tokenizer_path)
        outputs.write_metrics(out_dir, final, tuple(self.history))
        if with_samples:
            outputs.write_samples(
                out_dir,
                generate_samples(
                    self.session.model,
                    self.inputs.tokenizer,
                    spec.evaluation.sample_prompts,
                    max_new_tokens=spec.evaluation.sample_max_new_tokens,
                    eos_id=self.special.eos_id,
                    seed=self.training.seed,
                    device=self.runtime.device,
                ),
            )
        sha = artifacts.write_manifest(out_dir, self._manifest(status, final))
        self.reporter.artifacts(ArtifactsStatus(path=self._artifacts_path(), manifest_sha256=sha))
        return sha

    def _artifacts_path(self) -> str:
        out_dir = self.inputs.out_dir.resolve()
        root = self.artifacts_root
        return str(out_dir.relative_to(root)) if root in out_dir.parents else str(out_dir)

    def _manifest(
        self, status: Literal["succeeded", "cancelled"], final: EvalMetrics | None
    ) -> dict[str, JsonValue]:
        inputs = self.inputs
        run = inputs.run
        duration = time.monotonic() - self.started
        return {
            "apiVersion": API_VERSION,
            "kind": "TrainingRun",
            "name": run.metadata.name,
            "namespace": run.metadata.namespace,
            "uid": run.metadata.uid,
            "status": status,
            "config": run.spec.model_dump(mode="json", by_alias=True),
            "tokenizer": {
                "path": str(inputs.tokenizer_path),
                "sha256": inputs.tokenizer_sha256,
            },
            "corpus": {
                "source": inputs.corpus.source,
                "sha256": inputs.corpus.sha256,
                "trainBytes": len(inputs.split.train.encode("utf-8")),
                "holdoutBytes": inputs.split.holdout_bytes,
                "trainTokens": inputs.train_tokens.numel(),
                "evalTokens": inputs.holdout.tokens.numel(),
                "evalBytes": inputs.holdout.n_bytes,
            },
            "versions": outputs.versions(),
            "system": outputs.SystemInfo(
                device=str(self.runtime.device),
                precision=self.runtime.precision,
                threads=self.runtime.threads,
                compiled=self.runner.compiled,
            ).to_json(),
            "steps": self.step,
            "resumedFromStep": self.resumed_from,
            "tokensSeen": self.tokens_seen,
            "metrics": None if final is None else final.model_dump(mode="json", by_alias=True),
            "timings": outputs.Timings(
                started_at=self.started_at,
                finished_at=_utc_now(),
                duration_seconds=duration,
                tokens_per_second=self.tracker.session_tokens_per_second,
            ).to_json(),
        }


def train_model(
    run: TrainingRun,
    out_dir: Path,
    tokenizer_path: Path,
    ctx: CorpusContext,
    reporter: Reporter,
) -> TrainResult:
    """Train `run` into `out_dir`, resuming from its newest valid checkpoint.

    Raises JobCancelled (after a checkpoint and a "cancelled" manifest) once
    reporter.cancel_requested() turns true, and TrainerError subclasses for user-facing failures.
    """
    started, started_at = time.monotonic(), _utc_now()
    artifacts.retire_manifest(out_dir)
    inputs = _prepare(run, out_dir, tokenizer_path, ctx)
    return _Run(
        inputs, reporter, started_at=started_at, started=started, artifacts_root=ctx.artifacts_root
    ).train()
