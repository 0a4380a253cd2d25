"""End-to-end training of tiny GPT-2 models: outputs, manifest, determinism, evaluation entry
points and bad input."""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

import model_trainer
from lm_support import RecordingReporter, Workspace, quiet_runtime, tiny_run, workspace
from model_trainer import artifacts
from model_trainer.api import CorpusSource, EvalMetrics
from model_trainer.corpus import load_corpus, split_holdout
from model_trainer.errors import ArtifactWriteError, InvalidInputError, TokenizerNotFoundError
from model_trainer.lm import (
    TrainResult,
    checkpoint,
    device,
    evaluate_model,
    evaluate_run_dir,
    train_model,
)

OUTPUT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "eval/metrics.json",
    "eval/samples.jsonl",
    "manifest.json",
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return workspace(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def trained(ws: Workspace) -> Iterator[tuple[TrainResult, RecordingReporter, Path]]:
    with pytest.MonkeyPatch.context() as mp:
        quiet_runtime(mp)
        reporter = RecordingReporter()
        out_dir = ws.out_dir("trained")
        result = train_model(tiny_run(ws.corpus), out_dir, ws.tokenizer, ws.ctx, reporter)
        yield result, reporter, out_dir


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_runtime(monkeypatch)


def _output_files(out_dir: Path) -> set[str]:
    return {
        p.relative_to(out_dir).as_posix()
        for p in out_dir.rglob("*")
        if p.is_file() and p.relative_to(out_dir).parts[0] != artifacts.CHECKPOINTS_DIR
    }


def test_outputs_are_exactly_the_expected_files(
    trained: tuple[TrainResult, RecordingReporter, Path],
) -> None:
    result, _, out_dir = trained
    assert _output_files(out_dir) == OUTPUT_FILES
    checkpoints = sorted(p.name for p in (out_dir / artifacts.CHECKPOINTS_DIR).iterdir())
    assert checkpoints == ["step-00000008", "step-00000012"]  # every 4 steps, last 2 kept
    assert sorted(p.name for p in (out_dir / "checkpoints/step-00000012").iterdir()) == [
        "meta.json",
        "model.safetensors",
        "optimizer.pt",
        "rng.safetensors",
    ]
    assert result.steps == 12
    assert result.resumed_from_step is None
    assert result.duration_seconds > 0


def test_reports_progress_every_step_and_every_eval(
    trained: tuple[TrainResult, RecordingReporter, Path],
) -> None:
    result, reporter, _ = trained
    assert [p.step for p in reporter.progress_reports] == list(range(1, 13))
    last = reporter.progress_reports[-1]
    assert (last.percent, last.total_steps, last.eta_seconds) == (100, 12, 0.0)
    assert all(p.loss is not None and math.isfinite(p.loss) for p in reporter.progress_reports)
    assert all((p.tokens_per_second or 0) > 0 for p in reporter.progress_reports)
    assert [m.step for m in reporter.evals] == [5, 10, 12]
    assert reporter.evals[-1] == result.final_eval
    # A real evaluation, not a training batch's loss: bits per byte follow from the loss.
    assert result.final_eval.tokens > 1000
    assert reporter.artifact_reports[-1].manifest_sha256 == result.manifest_sha256


def test_manifest_describes_the_run(
    ws: Workspace, trained: tuple[TrainResult, RecordingReporter, Path]
) -> None:
    result, _, out_dir = trained
    manifest_bytes = (out_dir / "manifest.json").read_bytes()
    assert artifacts.sha256_bytes(manifest_bytes) == result.manifest_sha256
    manifest = json.loads(manifest_bytes)
    run = tiny_run(ws.corpus)
    assert manifest["kind"] == "TrainingRun"
    assert (manifest["name"], manifest["namespace"], manifest["uid"]) == (
        "tiny",
        "test",
        "uid-1234",
    )
    assert manifest["status"] == "succeeded"
    assert manifest["config"] == run.spec.model_dump(mode="json", by_alias=True)
    assert manifest["tokenizer"] == {
        "path": str(ws.tokenizer),
        "sha256": artifacts.sha256_file(ws.tokenizer),
    }
    corpus = load_corpus(CorpusSource(path=str(ws.corpus)), ws.ctx)
    split = split_holdout(corpus.text, 0.1)
    assert manifest["corpus"]["sha256"] == corpus.sha256
    assert manifest["corpus"]["trainBytes"] == len(split.train.encode())
    assert manifest["corpus"]["holdoutBytes"] == split.holdout_bytes
    assert manifest["corpus"]["trainTokens"] > 10_000
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["model_trainer"] == model_trainer.__version__
    assert set(manifest["versions"]) >= {"python", "transformers", "tokenizers"}
    system = manifest["system"]
    assert (system["threads"], system["device"], system["compiled"]) == (1, "cpu", False)
    assert system["precision"] in ("bf16", "fp32")
    assert manifest["steps"] == 12
    assert manifest["metrics"] == result.final_eval.model_dump(mode="json", by_alias=True)
    assert set(manifest["timings"]) == {
        "startedAt",
        "finishedAt",
        "durationSeconds",
        "tokensPerSecond",
    }
    assert manifest["timings"]["tokensPerSecond"] > 0
    assert set(manifest["files"]) == OUTPUT_FILES - {"manifest.json"}
    for name, digest in manifest["files"].items():
        assert artifacts.sha256_file(out_dir / name) == digest
    metrics = json.loads((out_dir / "eval/metrics.json").read_text())
    assert EvalMetrics.model_validate(metrics["final"]) == result.final_eval
    assert [m["step"] for m in metrics["history"]] == [5, 10, 12]


def test_model_loads_with_transformers_offline(
    ws: Workspace,
    trained: tuple[TrainResult, RecordingReporter, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result, _, out_dir = trained
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = GPT2LMHeadModel.from_pretrained(out_dir)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode("ROMEO: What say you, my lord?")])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert isinstance(loss, torch.Tensor)
    assert math.isfinite(loss.item())
    assert model.config.n_positions == 32
    assert model.config.eos_token_id == 0
    assert model.config.pad_token_id == 1

    holdout = split_holdout(ws.corpus.read_text(encoding="utf-8"), 0.1).holdout
    again = evaluate_model(out_dir, holdout, batch_size=3)
    assert again.loss == pytest.approx(result.final_eval.loss, rel=1e-6)
    assert again.bits_per_byte == pytest.approx(result.final_eval.bits_per_byte, rel=1e-6)
    assert again.tokens == result.final_eval.tokens


def test_samples_are_written_per_prompt(
    trained: tuple[TrainResult, RecordingReporter, Path],
) -> None:
    _, _, out_dir = trained
    lines = (out_dir / "eval/samples.jsonl").read_text(encoding="utf-8").splitlines()
    samples = [json.loads(line) for line in lines]
    assert [s["prompt"] for s in samples] == ["The ", "ROMEO:"]
    assert all(isinstance(s["completion"], str) and s["completion"] for s in samples)


def test_evaluate_run_dir_writes_metrics(
    ws: Workspace, trained: tuple[TrainResult, RecordingReporter, Path], tmp_path: Path
) -> None:
    result, _, out_dir = trained
    corpus = CorpusSource(path=str(ws.corpus))
    out_file = tmp_path / "eval" / "holdout.json"
    holdout = evaluate_run_dir(out_dir, corpus, ws.ctx, "holdout", 0.1, out_file)
    assert holdout.loss == pytest.approx(result.final_eval.loss, rel=1e-6)
    assert EvalMetrics.model_validate_json(out_file.read_text()) == holdout
    everything = evaluate_run_dir(out_dir, corpus, ws.ctx, "all", 0.1, None, max_tokens=3000)
    assert everything.tokens == 2999
    assert everything.bits_per_byte > 0


def test_same_seed_same_loss_curve(ws: Workspace) -> None:
    def losses(seed: int, name: str) -> tuple[list[float | None], TrainResult, bytes]:
        reporter = RecordingReporter()
        run = tiny_run(
            ws.corpus,
            max_steps=8,
            seed=seed,
            gradient_accumulation=2,
            dropout=0.1,
            precision="fp32",
        )
        result = train_model(run, ws.out_dir(name), ws.tokenizer, ws.ctx, reporter)
        samples = (ws.out_dir(name) / "eval/samples.jsonl").read_bytes()
        return [p.loss for p in reporter.progress_reports], result, samples

    first, first_result, first_samples = losses(11, "seed-a")
    second, second_result, second_samples = losses(11, "seed-b")
    other, _, _ = losses(12, "seed-c")
    assert first == second
    assert first_result.final_eval == second_result.final_eval
    assert first_samples == second_samples
    assert (ws.out_dir("seed-a") / "model.safetensors").read_bytes() == (
        ws.out_dir("seed-b") / "model.safetensors"
    ).read_bytes()
    assert first != other


def test_evaluation_on_a_fixed_sample_of_tokens(ws: Workspace) -> None:
    run = tiny_run(ws.corpus, max_steps=2, eval_every=100, max_tokens=150)
    result = train_model(run, ws.out_dir("sample"), ws.tokenizer, ws.ctx, RecordingReporter())
    assert result.final_eval.tokens == 149
    assert result.final_eval.step == 2


def test_context_longer_than_the_corpus_is_invalid_input(tmp_path: Path) -> None:
    small = workspace(tmp_path, text="To be, or not to be: that is the question.\n" * 8)
    out_dir = small.out_dir()
    with pytest.raises(
        InvalidInputError,
        match=r"contextLength 512 is longer than the corpus: "
        r"the train split has \d+ tokens",
    ):
        train_model(
            tiny_run(small.corpus, context_length=512),
            out_dir,
            small.tokenizer,
            small.ctx,
            RecordingReporter(),
        )
    assert not (out_dir / "manifest.json").exists()


def test_missing_or_broken_tokenizer(ws: Workspace, tmp_path: Path) -> None:
    with pytest.raises(TokenizerNotFoundError, match="does not exist"):
        train_model(
            tiny_run(ws.corpus),
            tmp_path / "out",
            tmp_path / "nope.json",
            ws.ctx,
            RecordingReporter(),
        )
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerNotFoundError, match="cannot be loaded"):
        train_model(tiny_run(ws.corpus), tmp_path / "out", broken, ws.ctx, RecordingReporter())


def _disk_full(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_checkpointing(
    ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "manifest.json").write_text('{"status": "succeeded"}', encoding="utf-8")
    monkeypatch.setattr(checkpoint, "_write_durably", _disk_full)
    with pytest.raises(ArtifactWriteError, match="disk full"):
        train_model(tiny_run(ws.corpus), out_dir, ws.tokenizer, ws.ctx, RecordingReporter())
    assert not (out_dir / "manifest.json").exists()  # the old one was retired, none written
    assert list((out_dir / artifacts.CHECKPOINTS_DIR).iterdir()) == []


def test_disk_full_while_saving_the_model(
    ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "out"
    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", _disk_full)
    with pytest.raises(ArtifactWriteError, match="disk full"):
        train_model(
            tiny_run(ws.corpus, max_steps=3), out_dir, ws.tokenizer, ws.ctx, RecordingReporter()
        )
    assert not (out_dir / "manifest.json").exists()
    assert not (out_dir / "model.safetensors").exists()
    assert [p.name for p in out_dir.iterdir()] == [artifacts.CHECKPOINTS_DIR]


class _BrokenCompiledBody(torch.nn.Module):
    def forward(self, **_inputs: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("inductor: no working C++ compiler")


def test_failed_compilation_falls_back_to_eager(
    ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager = train_model(
        tiny_run(ws.corpus, max_steps=3),
        tmp_path / "eager",
        ws.tokenizer,
        ws.ctx,
        RecordingReporter(),
    )
    monkeypatch.setenv("MT_COMPILE", "1")
    monkeypatch.setattr(device, "c_compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(torch, "compile", lambda _module: _BrokenCompiledBody())
    with capture_logs() as logs:
        fallback = train_model(
            tiny_run(ws.corpus, max_steps=3),
            tmp_path / "fallback",
            ws.tokenizer,
            ws.ctx,
            RecordingReporter(),
        )
    events = [e["event"] for e in logs]
    assert events.count("compile_failed_falling_back_to_eager") == 1
    assert fallback.final_eval == eager.final_eval
    manifest = json.loads((tmp_path / "fallback/manifest.json").read_text())
    assert manifest["system"]["compiled"] is False
