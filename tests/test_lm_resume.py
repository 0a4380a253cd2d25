"""Cancellation, checkpoints and resumption: an interrupted run, once resumed, ends exactly
where an uninterrupted one ends; corrupt checkpoints are skipped, never retried."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lm_support import RecordingReporter, Workspace, quiet_runtime, tiny_run, workspace
from model_trainer.api import TrainingRun
from model_trainer.errors import JobCancelled
from model_trainer.lm import TrainResult, train_model

# On CPU with the same thread count, a resumed run replays exactly the same floating-point
# operations in the same order (weights, optimizer moments and every random generator are
# restored), so the results are bitwise equal and no tolerance is needed.
RESUME_LOSS_TOLERANCE = 0.0
MAX_STEPS = 12


def _run(ws: Workspace, seed: int = 5) -> TrainingRun:
    # Dropout and gradient accumulation make the run depend on every random generator.
    return tiny_run(
        ws.corpus,
        max_steps=MAX_STEPS,
        checkpoint_every=4,
        eval_every=5,
        gradient_accumulation=2,
        dropout=0.1,
        seed=seed,
    )


@dataclass(frozen=True)
class Reference:
    result: TrainResult
    losses: list[float | None]
    weights: bytes


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return workspace(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def reference(ws: Workspace) -> Iterator[Reference]:
    with pytest.MonkeyPatch.context() as mp:
        quiet_runtime(mp)
        reporter = RecordingReporter()
        out_dir = ws.out_dir("reference")
        result = train_model(_run(ws), out_dir, ws.tokenizer, ws.ctx, reporter)
        yield Reference(
            result,
            [p.loss for p in reporter.progress_reports],
            (out_dir / "model.safetensors").read_bytes(),
        )


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_runtime(monkeypatch)


def _interrupt(ws: Workspace, out_dir: Path, reporter: RecordingReporter) -> None:
    with pytest.raises(JobCancelled):
        train_model(_run(ws), out_dir, ws.tokenizer, ws.ctx, reporter)


def _resume(ws: Workspace, out_dir: Path) -> tuple[TrainResult, RecordingReporter]:
    reporter = RecordingReporter()
    return train_model(_run(ws), out_dir, ws.tokenizer, ws.ctx, reporter), reporter


def _assert_same_end(reference: Reference, result: TrainResult, out_dir: Path) -> None:
    assert result.steps == MAX_STEPS
    assert abs(result.final_eval.loss - reference.result.final_eval.loss) <= RESUME_LOSS_TOLERANCE
    assert result.final_eval == reference.result.final_eval
    assert (out_dir / "model.safetensors").read_bytes() == reference.weights


def _checkpoints(out_dir: Path) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir())


def test_cancel_then_resume_ends_where_an_uninterrupted_run_ends(
    ws: Workspace, reference: Reference, tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    reporter = RecordingReporter(cancel_after_steps=6)
    _interrupt(ws, out_dir, reporter)
    assert [p.step for p in reporter.progress_reports] == [1, 2, 3, 4, 5, 6]
    assert _checkpoints(out_dir) == ["step-00000004", "step-00000006"]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert (manifest["status"], manifest["steps"]) == ("cancelled", 6)
    assert reporter.artifact_reports[-1].manifest_sha256 is not None
    assert json.loads((out_dir / "eval/metrics.json").read_text())["final"]["step"] == 5
    assert (out_dir / "model.safetensors").is_file()

    result, resumed = _resume(ws, out_dir)
    assert result.resumed_from_step == 6
    assert [p.step for p in resumed.progress_reports] == list(range(7, MAX_STEPS + 1))
    assert [p.loss for p in resumed.progress_reports] == reference.losses[6:]
    assert [m.step for m in resumed.evals] == [10, 12]
    _assert_same_end(reference, result, out_dir)
    assert json.loads((out_dir / "manifest.json").read_text())["status"] == "succeeded"
    history = json.loads((out_dir / "eval/metrics.json").read_text())["history"]
    assert [m["step"] for m in history] == [5, 10, 12]  # the eval before the cancel is kept


def test_cancel_between_micro_batches_drops_the_partial_step(
    ws: Workspace, reference: Reference, tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    # Two calls per step (before it, and between its two micro-batches): call 8 comes in the
    # middle of step 4, after its first micro-batch drew data and dropout masks.
    reporter = RecordingReporter(cancel_on_call=8)
    _interrupt(ws, out_dir, reporter)
    assert len(reporter.progress_reports) == 3
    assert _checkpoints(out_dir) == ["step-00000003"]
    result, _ = _resume(ws, out_dir)
    assert result.resumed_from_step == 3
    _assert_same_end(reference, result, out_dir)


def test_corrupt_checkpoint_is_quarantined_and_the_previous_one_used(
    ws: Workspace, reference: Reference, tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    _interrupt(ws, out_dir, RecordingReporter(cancel_after_steps=10))
    assert _checkpoints(out_dir) == ["step-00000008", "step-00000010"]
    weights = out_dir / "checkpoints/step-00000010/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated

    with capture_logs() as logs:
        result, _ = _resume(ws, out_dir)
    warnings = [e for e in logs if e["event"] == "checkpoint_unusable"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert "model.safetensors does not match its sha256" in warnings[0]["error"]
    assert result.resumed_from_step == 8
    _assert_same_end(reference, result, out_dir)
    assert "step-00000010.corrupt" in _checkpoints(out_dir)


def test_no_valid_checkpoint_starts_fresh(
    ws: Workspace, reference: Reference, tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    _interrupt(ws, out_dir, RecordingReporter(cancel_after_steps=6))
    for name in ("step-00000004", "step-00000006"):
        (out_dir / "checkpoints" / name / "meta.json").write_bytes(b"\x00garbage\xff")

    with capture_logs() as logs:
        result, _ = _resume(ws, out_dir)
    events = [e["event"] for e in logs]
    assert events.count("checkpoint_unusable") == 2
    assert "no_valid_checkpoint_starting_fresh" in events
    assert result.resumed_from_step is None
    _assert_same_end(reference, result, out_dir)
    assert {"step-00000004.corrupt", "step-00000006.corrupt"} <= set(_checkpoints(out_dir))

    # Quarantined checkpoints are never tried again.
    with capture_logs() as again:
        _resume(ws, out_dir)
    assert not [e for e in again if e["event"] == "checkpoint_unusable"]


def test_checkpoint_of_a_different_spec_is_not_used(ws: Workspace, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    reporter = RecordingReporter(cancel_after_steps=4)
    with pytest.raises(JobCancelled):
        train_model(_run(ws, seed=99), out_dir, ws.tokenizer, ws.ctx, reporter)
    with capture_logs() as logs:
        result, _ = _resume(ws, out_dir)
    assert result.resumed_from_step is None
    assert any(e["event"] == "checkpoint_unusable" and "different spec" in e["error"] for e in logs)
    assert "step-00000004.stale" in _checkpoints(out_dir)


def test_restarting_a_finished_run_rewrites_its_outputs_without_training(
    ws: Workspace, reference: Reference, tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    shutil.copytree(ws.out_dir("reference"), out_dir)
    (out_dir / "manifest.json").unlink()  # as if the pod died while writing it
    result, reporter = _resume(ws, out_dir)
    assert result.resumed_from_step == MAX_STEPS
    assert reporter.progress_reports == []
    _assert_same_end(reference, result, out_dir)
    assert json.loads((out_dir / "manifest.json").read_text())["status"] == "succeeded"
