"""Local mode end to end through the CLI, and every bad-input case the trainer must survive:
a clear message, a non-zero exit, no traceback and no manifest presented as good."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lm_support import SHAKESPEARE, run_doc, tokenizer_doc
from model_trainer import protocol
from model_trainer.api import Phase
from model_trainer.artifacts import sha256_file
from model_trainer.cli import main
from model_trainer.errors import (
    EXIT_ARTIFACT_WRITE_FAILED,
    EXIT_CANCELLED,
    EXIT_INVALID_INPUT,
    EXIT_SUCCEEDED,
)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    (artifacts / "corpus.txt").write_text(text, encoding="utf-8")
    return tmp_path


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def write_yaml(path: Path, *docs: object) -> Path:
    path.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    return path


def manifests(root: Path) -> list[Path]:
    return sorted(root.rglob("manifest.json"))


def test_local_run_end_to_end(workspace: Path):
    files = [
        write_yaml(workspace / "tok.yaml", tokenizer_doc()),
        write_yaml(workspace / "run.yaml", run_doc()),
    ]
    artifacts = workspace / "artifacts"
    cmd = [sys.executable, "-m", "model_trainer", "run", "--artifacts", str(artifacts)]
    for f in files[::-1]:  # given out of order on purpose: dependency order is the runner's job
        cmd += ["-f", str(f)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == EXIT_SUCCEEDED, proc.stderr[-3000:]
    assert "TokenizerJob/tok: Succeeded" in proc.stdout
    assert "TrainingRun/gpt: Succeeded" in proc.stdout
    assert "holdout loss" in proc.stdout and "bits/byte" in proc.stdout

    tok_dir = artifacts / "default" / "tokenizerjobs" / "tok"
    run_dir = artifacts / "default" / "trainingruns" / "gpt"
    assert str(run_dir) in proc.stdout
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "eval/metrics.json",
        "eval/samples.jsonl",
        "logs.jsonl",
        "manifest.json",
    ):
        assert (run_dir / name).is_file(), name
    for directory in (tok_dir, run_dir):
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["status"] == "succeeded"
        for rel, digest in manifest["files"].items():
            assert sha256_file(directory / rel) == digest, rel
        events = [json.loads(line) for line in (directory / "logs.jsonl").read_text().splitlines()]
        assert {"job_started", "job_succeeded"} <= {e["event"] for e in events}
    # stderr is JSON lines only: structured logs, no stray output
    for line in proc.stderr.splitlines():
        json.loads(line)

    # On-demand evaluation of the finished model is its own entry point.
    metrics_path = workspace / "eval-train.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_trainer",
            "evaluate",
            "--model",
            str(run_dir),
            "-f",
            str(files[1]),
            "--artifacts",
            str(artifacts),
            "--split",
            "holdout",
            "--out",
            str(metrics_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    on_demand = json.loads(metrics_path.read_text())
    final = json.loads((run_dir / "eval" / "metrics.json").read_text())["final"]
    # The same model on the same holdout sample gives the same numbers as the run's final eval.
    assert on_demand["tokens"] == final["tokens"]
    assert abs(on_demand["loss"] - final["loss"]) < 1e-4
    assert json.loads(proc.stdout)["bitsPerByte"] == on_demand["bitsPerByte"]


def run_cli(workspace: Path, *docs: object, redis_url: str | None = None) -> int:
    path = write_yaml(workspace / "input.yaml", *docs)
    args = ["run", "-f", str(path), "--artifacts", str(workspace / "artifacts")]
    return main(args + (["--redis-url", redis_url] if redis_url else []))


@pytest.mark.parametrize(
    ("prepare", "docs", "message"),
    [
        (lambda a: (a / "empty.txt").write_text(""), [tokenizer_doc("empty.txt")], "is empty"),
        (lambda a: None, [tokenizer_doc("missing.txt")], "does not exist"),
        (
            lambda a: (a / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 50),
            [tokenizer_doc("latin1.txt")],
            "not UTF-8",
        ),
        (lambda a: None, [tokenizer_doc(vocabSize=100)], "below the byte-level alphabet"),
        (
            lambda a: None,
            [tokenizer_doc(), run_doc(model={"nEmbd": 30, "nHead": 4})],
            "divisible by nHead",
        ),
        (lambda a: None, [run_doc(tokenizer="nope")], "TokenizerJob 'nope'"),
        (
            lambda a: (a / "short.txt").write_text("to be or not to be\n" * 40),
            [tokenizer_doc(), run_doc(corpus="short.txt", model={"contextLength": 1024})],
            "longer than the corpus",
        ),
    ],
    ids=[
        "empty-corpus",
        "missing-corpus",
        "not-utf8",
        "vocab-below-alphabet",
        "nembd-not-divisible",
        "missing-tokenizer",
        "context-longer-than-corpus",
    ],
)
def test_bad_input_gets_a_clear_error(workspace: Path, capfd, prepare, docs, message):
    artifacts = workspace / "artifacts"
    prepare(artifacts)
    code = run_cli(workspace, *docs)
    out, err = capfd.readouterr()
    assert code == EXIT_INVALID_INPUT
    assert message in err
    assert "Traceback" not in err and "Traceback" not in out
    good = [m for m in manifests(artifacts) if "trainingruns" in m.parts or len(docs) == 1]
    assert good == [], "a failed job left a manifest behind"


def _limit_file_size() -> None:
    # A real write failure without root: the kernel refuses writes past this size with EFBIG
    # (Python ignores SIGXFSZ), the same path an ENOSPC takes through our code.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_write_failure_on_the_artifacts_volume(workspace: Path):
    files = [
        write_yaml(workspace / "tok.yaml", tokenizer_doc()),
        write_yaml(
            workspace / "run.yaml",
            run_doc(model={"nLayer": 2, "nHead": 2, "nEmbd": 64, "contextLength": 32}),
        ),
    ]
    artifacts = workspace / "artifacts"
    cmd = [
        sys.executable,
        "-m",
        "model_trainer",
        "run",
        "--artifacts",
        str(artifacts),
        "-f",
        str(files[0]),
        "-f",
        str(files[1]),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=_limit_file_size,
        env={**os.environ, "MT_COMPILE": "0"},
    )
    assert proc.returncode == EXIT_ARTIFACT_WRITE_FAILED, proc.stderr[-3000:]
    failure = [json.loads(line) for line in proc.stderr.splitlines() if '"job_failed"' in line]
    assert len(failure) == 1, proc.stderr[-1500:]
    assert failure[0]["reason"] == "ArtifactWriteFailed"
    assert str(failure[0]["error"]).startswith("file size limit reached while writing ")
    assert "Traceback" not in proc.stderr
    assert not (artifacts / "default" / "trainingruns" / "gpt" / "manifest.json").exists()
    assert "TrainingRun/gpt: Failed" in proc.stdout


def test_local_mode_speaks_the_redis_protocol(workspace: Path, redis_server, capfd):
    tok, run = tokenizer_doc(), run_doc()
    tok["metadata"] = {"name": "tok", "uid": "tok-uid-1"}
    run["metadata"] = {"name": "gpt", "uid": "run-uid-1"}
    code = run_cli(workspace, tok, run, redis_url=redis_server.url)
    capfd.readouterr()
    assert code == EXIT_SUCCEEDED
    client = redis_server.client()
    snap = protocol.read_run(client, "run-uid-1")
    assert snap.state is not None and snap.state.phase is Phase.SUCCEEDED
    assert snap.state.artifacts is not None and snap.state.artifacts.manifest_sha256
    assert snap.progress is not None and snap.progress.step == snap.progress.total_steps == 12
    assert snap.eval is not None and snap.eval.step == 12
    assert snap.heartbeat is not None
    tok_snap = protocol.read_run(client, "tok-uid-1")
    assert tok_snap.state is not None and tok_snap.state.phase is Phase.SUCCEEDED
    assert tok_snap.stats is not None and tok_snap.stats.holdout_tokens > 0
    assert snap.stats is None  # a TrainingRun has no tokenizer stats


def test_cancel_flag_in_redis_stops_a_local_run(workspace: Path, redis_server, capfd):
    run = run_doc(
        training={
            "maxSteps": 100000,
            "batchSize": 4,
            "warmupSteps": 2,
            "evalEvery": 1000,
            "checkpointEvery": 1000,
            "precision": "fp32",
        }
    )
    run["metadata"] = {"name": "gpt", "uid": "run-uid-cancel"}
    client = redis_server.client()
    protocol.request_cancel(client, "run-uid-cancel")  # set before the run even starts
    code = run_cli(workspace, tokenizer_doc(), run, redis_url=redis_server.url)
    capfd.readouterr()
    assert code == EXIT_CANCELLED
    run_dir = workspace / "artifacts" / "default" / "trainingruns" / "gpt"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "cancelled"
    assert sorted((run_dir / "checkpoints").iterdir()), "cancel must leave a checkpoint"
    snap = protocol.read_run(client, "run-uid-cancel")
    assert snap.state is not None and snap.state.phase is Phase.CANCELLED


def test_pod_entry_point_reports_to_redis_and_stays_inside_the_volume(
    workspace: Path, redis_server
):
    artifacts = workspace / "artifacts"
    good = tokenizer_doc()
    good["metadata"] = {"name": "tok", "namespace": "team-a", "uid": "pod-uid-1"}
    escaping = tokenizer_doc("/etc/hostname")
    escaping["metadata"] = {"name": "tok2", "uid": "pod-uid-2"}
    env = {
        **os.environ,
        "MT_REDIS_URL": redis_server.url,
        "MT_ARTIFACTS_DIR": str(artifacts),
        "MT_ATTEMPT": "1",
    }
    client = redis_server.client()
    pubsub = client.pubsub()
    pubsub.subscribe(protocol.keys_for("pod-uid-1").events)
    assert isinstance(pubsub.get_message(timeout=2.0), dict)
    results = []
    for doc in (good, escaping):
        proc = subprocess.run(
            [sys.executable, "-m", "model_trainer", "job"],
            env={**env, "MT_RESOURCE": json.dumps(doc)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        results.append(proc)
    assert results[0].returncode == EXIT_SUCCEEDED, results[0].stderr[-2000:]
    tok_dir = artifacts / "team-a" / "tokenizerjobs" / "tok"
    assert (tok_dir / "tokenizer.json").is_file()
    snap = protocol.read_run(client, "pod-uid-1")
    state = snap.state
    assert state is not None and state.phase is Phase.SUCCEEDED and state.attempt == 1
    # The operator mirrors status.stats of a TokenizerJob from here.
    manifest = json.loads((tok_dir / "manifest.json").read_text())
    assert snap.stats is not None and snap.stats.vocab_size == 320
    assert snap.stats.model_dump(mode="json", by_alias=True) == manifest["stats"]
    kinds = []
    while (message := pubsub.get_message(timeout=0.3)) is not None:
        if message["type"] == "message":
            event = protocol.RunEvent.model_validate_json(message["data"])
            kinds.append(event.type if event.state is None else f"state:{event.state.phase}")
    pubsub.close()
    assert "stats" in kinds and kinds[-1] == "state:Succeeded"
    assert kinds.index("stats") < kinds.index("state:Succeeded"), kinds

    # In a pod an absolute corpus path is read inside the artifacts volume, never the host's.
    assert results[1].returncode == EXIT_INVALID_INPUT
    assert "does not exist" in results[1].stderr and str(artifacts) in results[1].stderr
    failed = protocol.read_run(client, "pod-uid-2")
    assert failed.state is not None and failed.state.phase is Phase.FAILED
    assert failed.state.reason == "InvalidCorpus"
    assert failed.stats is None
    client.close()


def _start_run(workspace: Path, *docs: object) -> subprocess.Popen[str]:
    path = write_yaml(workspace / "proc.yaml", *docs)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "model_trainer",
            "run",
            "-f",
            str(path),
            "--artifacts",
            str(workspace / "artifacts"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _events(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "logs.jsonl").read_text().splitlines()]


LONG_TRAINING = {
    "maxSteps": 400,
    "batchSize": 4,
    "warmupSteps": 2,
    "evalEvery": 400,
    "checkpointEvery": 10,
    "learningRate": 0.003,
    "precision": "fp32",
}


def test_a_killed_run_resumes_from_its_last_checkpoint(workspace: Path):
    run_dir = workspace / "artifacts" / "default" / "trainingruns" / "gpt"
    docs = (tokenizer_doc(), run_doc(training={**LONG_TRAINING, "maxSteps": 40}))
    proc = _start_run(workspace, *docs)
    _wait_for(run_dir / "checkpoints" / "step-00000020", proc)
    proc.kill()  # no chance to clean up, as when a node dies
    proc.communicate()
    assert not (run_dir / "manifest.json").exists()

    proc = _start_run(workspace, *docs)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_SUCCEEDED, err[-2000:]
    resumed = [e for e in _events(run_dir) if e["event"] == "resumed_from_checkpoint"]
    assert len(resumed) == 1
    step = resumed[0]["step"]
    assert isinstance(step, int) and step >= 20
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["steps"] == 40
    assert manifest["resumedFromStep"] == step


def test_sigterm_cancels_gracefully_and_keeps_the_artifacts(workspace: Path):
    run_dir = workspace / "artifacts" / "default" / "trainingruns" / "gpt"
    proc = _start_run(workspace, tokenizer_doc(), run_doc(training=LONG_TRAINING))
    _wait_for(run_dir / "checkpoints" / "step-00000010", proc)
    proc.send_signal(signal.SIGTERM)  # what kubelet sends when the pod is deleted
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CANCELLED, err[-2000:]
    assert "TrainingRun/gpt: Cancelled" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "cancelled"
    last = max((run_dir / "checkpoints").iterdir())
    assert int(last.name.removeprefix("step-")) == manifest["steps"] >= 10
    assert (run_dir / "model.safetensors").is_file()
    assert "Traceback" not in err


def test_local_mode_reads_a_corpus_configmap_from_the_same_files(workspace: Path, capfd):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "corpus"},
        "data": {"a.txt": text, "b.txt": "tail line\n" * 20},
    }
    job = {
        "apiVersion": "modeltrainer.io/v1alpha1",
        "kind": "TokenizerJob",
        "metadata": {"name": "tok"},
        "spec": {"vocabSize": 320, "corpus": {"configMapRef": {"name": "corpus", "key": "a.txt"}}},
    }
    assert run_cli(workspace, config_map, job) == EXIT_SUCCEEDED
    capfd.readouterr()
    manifest = json.loads(
        (workspace / "artifacts/default/tokenizerjobs/tok/manifest.json").read_text()
    )
    assert manifest["corpus"]["source"] == "configMap:corpus/a.txt"
    assert manifest["corpus"]["bytes"] == len(text.encode("utf-8"))
