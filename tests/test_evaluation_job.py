"""The evaluation pod (`model-trainer job --evaluation NAME`) on a tiny finished TrainingRun,
against a real redis-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from lm_support import SHAKESPEARE, RecordingReporter, Workspace, quiet_runtime, tiny_run, workspace
from model_trainer import cli, protocol
from model_trainer.api import EvalMetrics, Phase, TrainingRun
from model_trainer.artifacts import job_dir, sha256_file
from model_trainer.cli import main
from model_trainer.errors import EXIT_CANCELLED, EXIT_INVALID_INPUT, EXIT_SUCCEEDED
from model_trainer.lm import train_model
from redis_server import RedisServer

EVALUATIONS = [
    {"name": "held"},
    {"name": "train", "split": "train"},
    {"name": "train-capped", "split": "train", "maxTokens": 300},
    {"name": "whole", "corpus": {"path": "big.txt"}, "split": "all"},
    {"name": "escape", "corpus": {"path": "/etc/hostname"}, "split": "all"},
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return workspace(tmp_path_factory.mktemp("evaluation"))


@pytest.fixture(scope="module")
def finished(ws: Workspace) -> TrainingRun:
    """A Succeeded tiny run in <root>/test/trainingruns/tiny; its corpus is on the volume."""
    run = tiny_run(Path("corpus.txt"), max_steps=6, eval_every=6, checkpoint_every=6)
    with pytest.MonkeyPatch.context() as mp:
        quiet_runtime(mp)
        train_model(run, run_dir(ws, run), ws.tokenizer, ws.ctx, RecordingReporter())
    return run


@pytest.fixture(autouse=True)
def _quiet_and_restore_signals(monkeypatch: pytest.MonkeyPatch):
    quiet_runtime(monkeypatch)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def run_dir(ws: Workspace, run: TrainingRun) -> Path:
    return job_dir(ws.root, run.metadata.namespace, "TrainingRun", run.metadata.name)


def resource_json(run: TrainingRun, uid: str, name: str | None = None) -> str:
    doc = run.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["metadata"]["uid"] = uid
    if name is not None:
        doc["metadata"]["name"] = name
    doc["spec"]["evaluations"] = EVALUATIONS
    return json.dumps(doc)


def digests(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def pod_env(ws: Workspace, resource: str, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "MT_RESOURCE": resource,
        "MT_REDIS_URL": redis_url,
        "MT_ARTIFACTS_DIR": str(ws.root),
        "MT_CONFIGMAP_DIR": str(ws.root / "configmaps"),
        **extra,
    }


def evaluation_events(pubsub: redis.client.PubSub) -> list[protocol.EvaluationReport]:
    reports = []
    while (message := pubsub.get_message(timeout=0.3)) is not None:
        if message["type"] == "message":
            event = protocol.RunEvent.model_validate_json(message["data"])
            assert event.type == "evaluation" and event.evaluation is not None
            reports.append(event.evaluation)
    return reports


def run_in_process(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, resource: str, redis_url: str, name: str
) -> int:
    monkeypatch.setenv("MT_RESOURCE", resource)
    return main(
        [
            "job",
            "--artifacts",
            str(ws.root),
            "--redis-url",
            redis_url,
            "--evaluation",
            name,
            "--attempt",
            "1",
        ]
    )


def test_pod_evaluates_the_holdout_and_leaves_the_run_untouched(
    ws: Workspace, finished: TrainingRun, redis_server: RedisServer, redis_client: redis.Redis
):
    uid = str(uuid.uuid4())
    out = run_dir(ws, finished)
    before = digests(out)
    assert {"model.safetensors", "manifest.json", "eval/metrics.json"} <= set(before)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(protocol.keys_for(uid).events)
    assert isinstance(pubsub.get_message(timeout=2.0), dict)

    proc = subprocess.run(
        [sys.executable, "-m", "model_trainer", "job"],
        env=pod_env(
            ws,
            resource_json(finished, uid),
            redis_server.url,
            MT_EVALUATION="held",
            MT_ATTEMPT="2",
        ),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == EXIT_SUCCEEDED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr

    after = digests(out)
    new = set(after) - set(before)
    assert new == {"eval/held/metrics.json", "eval/held/logs.jsonl"}
    assert {rel: after[rel] for rel in before} == before, "the run's files changed"

    written = EvalMetrics.model_validate_json((out / "eval/held/metrics.json").read_text())
    report = protocol.read_evaluations(redis_client, uid, ["held", "train"])
    assert set(report) == {"held"}
    held = report["held"]
    assert (held.phase, held.reason, held.attempt) == (Phase.SUCCEEDED, "Succeeded", 2)
    assert held.path == "eval/held/metrics.json"
    assert held.metrics == written
    # The whole holdout with the run's holdoutFraction: exactly what the run's final eval saw.
    final = json.loads((out / "eval/metrics.json").read_text())["final"]
    assert written.tokens == final["tokens"] > 0
    assert abs(written.loss - final["loss"]) < 1e-4

    phases = [r.phase for r in evaluation_events(pubsub)]
    pubsub.close()
    assert phases == [Phase.RUNNING, Phase.SUCCEEDED]
    events = [json.loads(line)["event"] for line in (out / "eval/held/logs.jsonl").open()]
    assert {"evaluation_started", "model_evaluated", "evaluation_succeeded"} <= set(events)
    # A pod evaluation is no training job: it leaves the run's own state and heartbeat alone.
    snap = protocol.read_run(redis_client, uid)
    assert (snap.state, snap.heartbeat) == (None, None)


def test_train_split_and_max_tokens(
    ws: Workspace,
    finished: TrainingRun,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfd,
):
    termination_log = tmp_path / "termination-log"
    termination_log.write_text("")
    monkeypatch.setattr(cli, "TERMINATION_LOG", termination_log)
    uid = str(uuid.uuid4())
    resource = resource_json(finished, uid)
    for name in ("held", "train", "train-capped"):
        assert run_in_process(ws, monkeypatch, resource, redis_server.url, name) == 0, name
    capfd.readouterr()
    assert termination_log.read_text().startswith("Succeeded: loss ")

    reports = protocol.read_evaluations(redis_client, uid, ["held", "train", "train-capped"])
    metrics = {}
    for name, report in reports.items():
        assert report.phase is Phase.SUCCEEDED and report.attempt == 1
        assert report.metrics is not None
        metrics[name] = report.metrics
        assert report.metrics == EvalMetrics.model_validate_json(
            (run_dir(ws, finished) / f"eval/{name}/metrics.json").read_text()
        )
    # holdoutFraction 0.1: the train split is about nine times the holdout.
    assert metrics["train"].tokens > 5 * metrics["held"].tokens
    assert metrics["train-capped"].tokens < 300 < metrics["held"].tokens
    assert metrics["train"].loss != metrics["held"].loss


def test_missing_entry_is_invalid_input_and_writes_nothing(
    ws: Workspace,
    finished: TrainingRun,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfd,
):
    termination_log = tmp_path / "termination-log"
    termination_log.write_text("")
    monkeypatch.setattr(cli, "TERMINATION_LOG", termination_log)
    uid = str(uuid.uuid4())
    before = digests(ws.root)
    code = run_in_process(ws, monkeypatch, resource_json(finished, uid), redis_server.url, "nope")
    out, err = capfd.readouterr()
    assert code == EXIT_INVALID_INPUT
    assert "TrainingRun tiny has no evaluation named 'nope' in spec.evaluations" in err
    assert "'held', 'train'" in err
    assert "Traceback" not in err + out
    assert digests(ws.root) == before
    assert list(redis_client.scan_iter(match=f"{protocol.KEY_PREFIX}:{uid}:*")) == []
    assert termination_log.read_text().startswith("InvalidInput: TrainingRun tiny has no")


def test_missing_model_is_invalid_input_and_writes_no_files(
    ws: Workspace,
    finished: TrainingRun,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capfd,
):
    uid = str(uuid.uuid4())
    before = digests(ws.root)
    resource = resource_json(finished, uid, name="never-trained")
    code = run_in_process(ws, monkeypatch, resource, redis_server.url, "held")
    out, err = capfd.readouterr()
    assert code == EXIT_INVALID_INPUT
    assert "TrainingRun never-trained has no finished model" in err
    assert "model.safetensors" in err
    assert "Traceback" not in err + out
    assert digests(ws.root) == before
    assert not (ws.root / "test/trainingruns/never-trained").exists()
    # The operator learns why from Redis as well as from the exit code.
    report = protocol.read_evaluations(redis_client, uid, ["held"])["held"]
    assert (report.phase, report.reason) == (Phase.FAILED, "ModelNotFound")
    assert report.metrics is None and report.path is None


def test_corpus_paths_stay_inside_the_volume(
    ws: Workspace,
    finished: TrainingRun,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capfd,
):
    uid = str(uuid.uuid4())
    code = run_in_process(ws, monkeypatch, resource_json(finished, uid), redis_server.url, "escape")
    _, err = capfd.readouterr()
    assert code == EXIT_INVALID_INPUT
    assert f"corpus path {ws.root / 'etc/hostname'} does not exist" in err
    report = protocol.read_evaluations(redis_client, uid, ["escape"])["escape"]
    assert (report.phase, report.reason) == (Phase.FAILED, "InvalidCorpus")
    assert report.attempt == 1 and report.metrics is None
    assert not (run_dir(ws, finished) / "eval/escape/metrics.json").exists()


def test_redis_outage_does_not_fail_the_evaluation(
    ws: Workspace, finished: TrainingRun, monkeypatch: pytest.MonkeyPatch, capfd
):
    uid = str(uuid.uuid4())
    started = time.monotonic()
    code = run_in_process(
        ws, monkeypatch, resource_json(finished, uid), "redis://127.0.0.1:1/0", "train-capped"
    )
    took = time.monotonic() - started
    _, err = capfd.readouterr()
    assert code == EXIT_SUCCEEDED, err[-2000:]
    assert (run_dir(ws, finished) / "eval/train-capped/metrics.json").is_file()
    logs = [json.loads(line) for line in err.splitlines() if line.strip()]
    warnings = [e["event"] for e in logs if e["level"] == "warning"]
    # One warning for the outage; the final report is retried briefly, then given up.
    assert warnings == ["redis_unreachable", "redis_flush_abandoned"], warnings
    assert took < 30, took


def write_big_corpus(ws: Workspace) -> None:
    # The whole of tinyshakespeare takes the tiny model seconds: time enough to be interrupted.
    (ws.root / "big.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8"), encoding="utf-8")


def test_sigterm_in_the_middle_of_the_evaluation_cancels_it(
    ws: Workspace,
    finished: TrainingRun,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capfd,
):
    write_big_corpus(ws)
    uid = str(uuid.uuid4())
    job_log = run_dir(ws, finished) / "eval/whole/logs.jsonl"
    job_log.unlink(missing_ok=True)
    sent = threading.Event()

    def terminate_once_started() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if job_log.exists() and "evaluation_started" in job_log.read_text():
                time.sleep(0.3)  # well inside evaluate_run_dir, which takes seconds here
                sent.set()
                os.kill(os.getpid(), signal.SIGTERM)  # kubelet deleting the pod
                return
            time.sleep(0.01)

    killer = threading.Thread(target=terminate_once_started, daemon=True)
    killer.start()
    code = run_in_process(ws, monkeypatch, resource_json(finished, uid), redis_server.url, "whole")
    killer.join()
    _, err = capfd.readouterr()
    assert sent.is_set()
    assert code == EXIT_CANCELLED, err[-2000:]
    events = [json.loads(line)["event"] for line in job_log.open()]
    assert "evaluation_cancelled" in events and "model_evaluated" not in events
    report = protocol.read_evaluations(redis_client, uid, ["whole"])["whole"]
    assert (report.phase, report.reason) == (Phase.CANCELLED, "Cancelled")
    assert not (run_dir(ws, finished) / "eval/whole/metrics.json").exists()


def test_sigterm_right_after_the_pod_starts_cancels_it(
    ws: Workspace, finished: TrainingRun, redis_server: RedisServer, redis_client: redis.Redis
):
    write_big_corpus(ws)
    uid = str(uuid.uuid4())
    out = run_dir(ws, finished)
    proc = subprocess.Popen(
        [sys.executable, "-m", "model_trainer", "job", "--evaluation", "whole"],
        env=pod_env(ws, resource_json(finished, uid), redis_server.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while "whole" not in protocol.read_evaluations(redis_client, uid, ["whole"]):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the evaluation never reported Running"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_CANCELLED, err[-2000:]
    assert "Traceback" not in err
    report = protocol.read_evaluations(redis_client, uid, ["whole"])["whole"]
    assert (report.phase, report.reason) == (Phase.CANCELLED, "Cancelled")
    assert not (out / "eval/whole/metrics.json").exists()
    events = [json.loads(line)["event"] for line in (out / "eval/whole/logs.jsonl").open()]
    assert "evaluation_cancelled" in events and "model_evaluated" not in events
