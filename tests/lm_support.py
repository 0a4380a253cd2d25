"""Helpers of the language-model tests: a tiny byte-level BPE tokenizer, a small corpus, tiny
TrainingRuns and a recording reporter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model_trainer.api import (
    ArtifactsStatus,
    CorpusSource,
    EvalMetrics,
    ModelSpec,
    ObjectMeta,
    Phase,
    Progress,
    TrainingRun,
    TrainingSpec,
)
from model_trainer.api.tokenizer_job import TokenizerStats
from model_trainer.api.training_run import EvaluationSpec, TokenizerRef, TrainingRunSpec
from model_trainer.corpus import CorpusContext

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]
CORPUS_CHARS = 30_000


def corpus_text(chars: int = CORPUS_CHARS) -> str:
    """The first `chars` characters of tinyshakespeare, cut at a line end, plus a line with
    multi-byte characters."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:chars]
    return text[: text.rfind("\n") + 1] + "Café naïve — “quoted” ☃ 日本語\n"


def build_tokenizer(path: Path, text: str, vocab_size: int = 400) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
    tokenizer.save(str(path))
    return path


@dataclass(frozen=True)
class Workspace:
    root: Path
    corpus: Path
    tokenizer: Path
    ctx: CorpusContext

    def out_dir(self, name: str = "run") -> Path:
        return self.root / "out" / name


def workspace(tmp_path: Path, text: str | None = None) -> Workspace:
    text = corpus_text() if text is None else text
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    tokenizer = build_tokenizer(tmp_path / "tokenizer.json", text)
    return Workspace(tmp_path, corpus, tokenizer, CorpusContext(artifacts_root=tmp_path))


def tiny_run(
    corpus: Path,
    *,
    max_steps: int = 12,
    eval_every: int = 5,
    checkpoint_every: int = 4,
    context_length: int = 32,
    precision: str = "auto",
    seed: int = 7,
    gradient_accumulation: int = 1,
    dropout: float = 0.0,
    max_tokens: int | None = None,
    name: str = "tiny",
) -> TrainingRun:
    return TrainingRun(
        metadata=ObjectMeta(name=name, namespace="test", uid="uid-1234"),
        spec=TrainingRunSpec(
            tokenizer_ref=TokenizerRef(name="tok"),
            corpus=CorpusSource(path=str(corpus)),
            holdout_fraction=0.1,
            model=ModelSpec(
                n_layer=2, n_head=2, n_embd=32, context_length=context_length, dropout=dropout
            ),
            training=TrainingSpec.model_validate(
                {
                    "max_steps": max_steps,
                    "batch_size": 4,
                    "gradient_accumulation": gradient_accumulation,
                    "learning_rate": 3e-3,
                    "warmup_steps": 2,
                    "eval_every": eval_every,
                    "checkpoint_every": checkpoint_every,
                    "precision": precision,
                    "seed": seed,
                }
            ),
            evaluation=EvaluationSpec(
                max_tokens=max_tokens, sample_prompts=["The ", "ROMEO:"], sample_max_new_tokens=8
            ),
        ),
    )


@dataclass
class RecordingReporter:
    """Records every report. Requests cancellation once `cancel_after_steps` steps ran, or from
    the `cancel_on_call`-th call of cancel_requested() on."""

    cancel_after_steps: int | None = None
    cancel_on_call: int | None = None
    cancel_calls: int = 0
    progress_reports: list[Progress] = field(default_factory=list)
    evals: list[EvalMetrics] = field(default_factory=list)
    stats_reports: list[TokenizerStats] = field(default_factory=list)
    artifact_reports: list[ArtifactsStatus] = field(default_factory=list)

    def phase(self, phase: Phase, message: str = "", reason: str = "") -> None:
        pass

    def progress(self, progress: Progress) -> None:
        self.progress_reports.append(progress)

    def eval(self, metrics: EvalMetrics) -> None:
        self.evals.append(metrics)

    def stats(self, stats: TokenizerStats) -> None:
        self.stats_reports.append(stats)

    def artifacts(self, artifacts: ArtifactsStatus) -> None:
        self.artifact_reports.append(artifacts)

    def cancel_requested(self) -> bool:
        self.cancel_calls += 1
        if self.cancel_on_call is not None and self.cancel_calls >= self.cancel_on_call:
            return True
        return (
            self.cancel_after_steps is not None
            and len(self.progress_reports) >= self.cancel_after_steps
        )

    def close(self) -> None:
        pass


def quiet_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread (deterministic and kind to the shared CPUs) and no torch.compile."""
    monkeypatch.setenv("MT_NUM_THREADS", "1")
    monkeypatch.setenv("MT_COMPILE", "0")


# Tiny TokenizerJob and TrainingRun documents, as a user writes them (YAML/JSON).
def tokenizer_doc(corpus: str = "corpus.txt", **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "modeltrainer.io/v1alpha1",
        "kind": "TokenizerJob",
        "metadata": {"name": "tok"},
        "spec": {"vocabSize": 320, "holdoutFraction": 0.1, "corpus": {"path": corpus}, **spec},
    }


def run_doc(corpus: str = "corpus.txt", tokenizer: str = "tok", **overrides: object):
    spec: dict[str, object] = {
        "tokenizerRef": {"name": tokenizer},
        "corpus": {"path": corpus},
        "holdoutFraction": 0.1,
        "model": {"nLayer": 2, "nHead": 2, "nEmbd": 32, "contextLength": 32},
        "training": {
            "maxSteps": 12,
            "batchSize": 4,
            "warmupSteps": 2,
            "evalEvery": 6,
            "checkpointEvery": 6,
            "learningRate": 0.003,
            "precision": "fp32",
        },
        "evaluation": {"maxTokens": 2048, "samplePrompts": ["ROMEO:"], "sampleMaxNewTokens": 8},
    }
    spec.update(overrides)
    return {
        "apiVersion": "modeltrainer.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "gpt"},
        "spec": spec,
    }
