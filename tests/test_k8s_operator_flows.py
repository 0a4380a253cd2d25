"""End-to-end flows of the operator against the real API server, Redis and trainer."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from kubernetes import client

from lm_support import corpus_text
from model_trainer import protocol
from model_trainer.api import Progress
from operator_support import Cluster, run_pod_locally, wait_for

pytestmark = pytest.mark.k8s

TOKENIZER_SPEC = {
    "algorithm": "bpe",
    "vocabSize": 400,
    "corpus": {"configMapRef": {"name": "corpus", "key": "text"}},
    "holdoutFraction": 0.1,
}
TRAINING = {
    "maxSteps": 30,
    "batchSize": 4,
    "warmupSteps": 2,
    "evalEvery": 10,
    "checkpointEvery": 10,
    "learningRate": 0.003,
}
RUN_SPEC = {
    "tokenizerRef": {"name": "tok"},
    "corpus": {"configMapRef": {"name": "corpus", "key": "text"}},
    "holdoutFraction": 0.1,
    "model": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "contextLength": 32},
    "training": TRAINING,
    "evaluation": {"maxTokens": 512, "samplePrompts": ["The "], "sampleMaxNewTokens": 4},
}


def make_corpus(cluster: Cluster) -> dict[str, dict[str, str]]:
    text = corpus_text(20_000)
    cluster.core.create_namespaced_config_map(
        cluster.namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="corpus"), data={"text": text}),
    )
    return {"corpus": {"text": text}}


def test_tokenizer_then_training_run_succeed_with_progress_and_eval(
    cluster: Cluster, start_operator, tmp_path: Path
):
    operator = start_operator()
    config_maps = make_corpus(cluster)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    run = cluster.create("TrainingRun", "run", RUN_SPEC)
    pending = cluster.wait_phase("TrainingRun", "run", "Pending")
    assert pending["reason"] == "WaitingForTokenizer"
    tok = cluster.create("TokenizerJob", "tok", TOKENIZER_SPEC)
    tok_pod = cluster.wait_pod(tok["metadata"]["uid"])
    assert cluster.owned_pods(run["metadata"]["uid"]) == []
    cluster.set_pod_phase(tok_pod.metadata.name, "Running")
    done = run_pod_locally(tok_pod, artifacts, config_maps)
    assert done.returncode == 0
    cluster.set_pod_phase(tok_pod.metadata.name, "Succeeded", exit_code=0)
    tok_status = cluster.wait_phase("TokenizerJob", "tok", "Succeeded")
    assert tok_status["stats"]["vocabSize"] == 400
    assert tok_status["attempts"] == 1

    run_pod = cluster.wait_pod(run["metadata"]["uid"])
    cluster.set_pod_phase(run_pod.metadata.name, "Running")
    done = run_pod_locally(run_pod, artifacts, config_maps)
    assert done.returncode == 0
    cluster.set_pod_phase(run_pod.metadata.name, "Succeeded", exit_code=0)
    status = cluster.wait_phase("TrainingRun", "run", "Succeeded")
    assert status["progress"]["step"] == 30
    assert status["progress"]["percent"] == 100
    assert status["eval"]["loss"] > 0
    assert status["lastHeartbeatTime"]
    assert status["completionTime"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert "Succeeded" in operator.metrics()


def train_tokenizer(cluster: Cluster, artifacts: Path, config_maps) -> None:
    """A TokenizerJob driven to Succeeded by the operator, with its real trainer run locally."""
    tok = cluster.create("TokenizerJob", "tok", TOKENIZER_SPEC)
    pod = cluster.wait_pod(tok["metadata"]["uid"])
    cluster.set_pod_phase(pod.metadata.name, "Running")
    assert run_pod_locally(pod, artifacts, config_maps).returncode == 0
    cluster.set_pod_phase(pod.metadata.name, "Succeeded", exit_code=0)
    cluster.wait_phase("TokenizerJob", "tok", "Succeeded")


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    path = tmp_path / "artifacts"
    path.mkdir()
    return path


def run_spec(**training):
    return {**RUN_SPEC, "training": {**TRAINING, **training}}


def wait_step(cluster: Cluster, name: str, step: int, timeout: float = 60.0):
    def probe():
        status = cluster.status("TrainingRun", name)
        progress = status.get("progress") or {}
        return status if progress.get("step", 0) >= step else None

    return wait_for(f"TrainingRun {name} at step {step}", probe, timeout)


def run_dir(artifacts: Path, namespace: str, name: str) -> Path:
    return artifacts / namespace / "trainingruns" / name


def test_cancel_during_training_keeps_artifacts_and_checkpoint(
    cluster: Cluster, start_operator, artifacts: Path, redis_client
):
    start_operator()
    config_maps = make_corpus(cluster)
    train_tokenizer(cluster, artifacts, config_maps)
    run = cluster.create("TrainingRun", "run", run_spec(maxSteps=5000, checkpointEvery=5))
    pod = cluster.wait_pod(run["metadata"]["uid"])
    cluster.set_pod_phase(pod.metadata.name, "Running")
    process = run_pod_locally(pod, artifacts, config_maps, wait=False)
    try:
        cluster.wait_phase("TrainingRun", "run", "Running")
        wait_step(cluster, "run", 6)
        cluster.patch_spec("TrainingRun", "run", {"cancel": True})
        assert process.wait(timeout=60) == 3
    finally:
        process.kill()
    status = cluster.wait_phase("TrainingRun", "run", "Cancelled")
    assert protocol.cancel_requested(redis_client, run["metadata"]["uid"])
    cluster.set_pod_phase(pod.metadata.name, "Failed", exit_code=3)
    out = run_dir(artifacts, cluster.namespace, "run")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "cancelled"
    assert list((out / "checkpoints").iterdir()), "the last checkpoint is kept"
    assert status["progress"]["step"] >= 6
    time.sleep(1.5)
    assert cluster.status("TrainingRun", "run")["phase"] == "Cancelled", "Cancelled is final"
    assert len(cluster.owned_pods(run["metadata"]["uid"])) == 1
    reasons = {e.reason for e in cluster.events("run")}
    assert {"CancelRequested", "Cancelled"} <= reasons


def test_failed_pod_is_replaced_and_the_new_attempt_resumes(
    cluster: Cluster, start_operator, artifacts: Path
):
    start_operator()
    config_maps = make_corpus(cluster)
    train_tokenizer(cluster, artifacts, config_maps)
    run = cluster.create("TrainingRun", "run", run_spec(maxSteps=60, checkpointEvery=10))
    uid = run["metadata"]["uid"]
    first = cluster.wait_pod(uid)
    cluster.set_pod_phase(first.metadata.name, "Running")
    process = run_pod_locally(first, artifacts, config_maps, wait=False)
    checkpoints = run_dir(artifacts, cluster.namespace, "run") / "checkpoints"
    try:
        wait_for(
            "a checkpoint at step 20",
            lambda: (
                any(p.name.endswith("20") for p in checkpoints.glob("*"))
                if checkpoints.is_dir()
                else None
            ),
            timeout=120,
        )
        process.send_signal(signal.SIGKILL)  # the node died: no graceful stop
        process.wait(timeout=30)
    finally:
        process.kill()
    cluster.set_pod_phase(first.metadata.name, "Failed", exit_code=137, reason="Error")

    second = cluster.wait_pod(uid, count=2)
    assert second.metadata.labels["modeltrainer.io/attempt"] == "2"
    assert second.metadata.name != first.metadata.name
    wait_for("attempts 2", lambda: cluster.status("TrainingRun", "run").get("attempts") == 2)
    cluster.set_pod_phase(second.metadata.name, "Running")
    assert run_pod_locally(second, artifacts, config_maps).returncode == 0
    cluster.set_pod_phase(second.metadata.name, "Succeeded", exit_code=0)
    status = cluster.wait_phase("TrainingRun", "run", "Succeeded")
    assert status["attempts"] == 2
    manifest = json.loads(
        (run_dir(artifacts, cluster.namespace, "run") / "manifest.json").read_text()
    )
    assert manifest["resumedFromStep"] >= 20
    retry_events = [e for e in cluster.events("run") if e.type == "Warning"]
    assert any("attempt 2" in (e.message or "") for e in retry_events)


def test_lost_heartbeat_sets_a_condition_then_fails_the_attempt(
    cluster: Cluster, start_operator, redis_client
):
    start_operator()
    tok = cluster.create("TokenizerJob", "tok", {**TOKENIZER_SPEC, "backoffLimit": 0})
    uid = tok["metadata"]["uid"]
    pod = cluster.wait_pod(uid)
    cluster.set_pod_phase(pod.metadata.name, "Running")
    protocol.write_heartbeat(redis_client, uid)
    running = cluster.wait_phase("TokenizerJob", "tok", "Running")
    assert running["lastHeartbeatTime"]

    def lost():
        status = cluster.status("TokenizerJob", "tok")
        return next(
            (
                c
                for c in status.get("conditions", [])
                if c["type"] == "HeartbeatLost" and c["status"] == "True"
            ),
            None,
        )

    condition = wait_for("the HeartbeatLost condition", lost, timeout=15)
    assert "no heartbeat" in condition["message"]
    assert cluster.status("TokenizerJob", "tok")["phase"] == "Running"
    status = cluster.wait_phase("TokenizerJob", "tok", "Failed", timeout=15)
    assert status["reason"] == "HeartbeatLost"
    wait_for("the silent pod to be deleted", lambda: not cluster.owned_pods(uid), timeout=10)


def test_operator_killed_mid_run_converges_without_duplicates(
    cluster: Cluster, start_operator, artifacts: Path
):
    operator = start_operator()
    config_maps = make_corpus(cluster)
    train_tokenizer(cluster, artifacts, config_maps)
    run = cluster.create("TrainingRun", "run", run_spec(maxSteps=80))
    uid = run["metadata"]["uid"]
    pod = cluster.wait_pod(uid)
    cluster.set_pod_phase(pod.metadata.name, "Running")
    process = run_pod_locally(pod, artifacts, config_maps, wait=False)
    try:
        wait_step(cluster, "run", 5)
        operator.kill()
        # While it is down: a new resource arrives, and the run goes on reporting to Redis.
        cluster.create("TokenizerJob", "tok2", TOKENIZER_SPEC)
        time.sleep(2)
        start_operator()
        assert process.wait(timeout=300) == 0
    finally:
        process.kill()
    cluster.set_pod_phase(pod.metadata.name, "Succeeded", exit_code=0)
    status = cluster.wait_phase("TrainingRun", "run", "Succeeded")
    assert status["attempts"] == 1
    assert status["progress"]["step"] == 80
    assert [p.metadata.name for p in cluster.owned_pods(uid)] == [pod.metadata.name]
    tok2 = cluster.get("TokenizerJob", "tok2")
    cluster.wait_pod(tok2["metadata"]["uid"])
    time.sleep(2)
    assert len(cluster.owned_pods(tok2["metadata"]["uid"])) == 1


def test_delete_cleans_up_and_recreating_the_name_starts_afresh(
    cluster: Cluster, start_operator, redis_client, artifacts: Path
):
    start_operator()
    tok = cluster.create("TokenizerJob", "tok", TOKENIZER_SPEC)
    old_uid = tok["metadata"]["uid"]
    old_pod = cluster.wait_pod(old_uid)
    cluster.set_pod_phase(old_pod.metadata.name, "Running")
    protocol.write_heartbeat(redis_client, old_uid)
    protocol.write_progress(redis_client, old_uid, Progress(step=7, total_steps=10, percent=70))
    cluster.wait_phase("TokenizerJob", "tok", "Running")
    marker = artifacts / cluster.namespace / "tokenizerjobs" / "tok" / "kept.txt"
    marker.parent.mkdir(parents=True)
    marker.write_text("artifacts outlive their resource")
    body = cluster.get("TokenizerJob", "tok")
    assert "modeltrainer.io/cleanup" in body["metadata"]["finalizers"]

    cluster.delete("TokenizerJob", "tok")
    wait_for("the resource to be gone", lambda: cluster.get("TokenizerJob", "tok") is None)
    assert cluster.owned_pods(old_uid) == []
    assert redis_client.keys(f"modeltrainer:v1:run:{old_uid}:*") == []
    assert marker.read_text() == "artifacts outlive their resource"

    again = cluster.create("TokenizerJob", "tok", TOKENIZER_SPEC)
    new_uid = again["metadata"]["uid"]
    assert new_uid != old_uid
    new_pod = cluster.wait_pod(new_uid)
    assert new_pod.metadata.name != old_pod.metadata.name
    status = cluster.wait_phase("TokenizerJob", "tok", "Pending")
    assert status["attempts"] == 1
    assert "progress" not in status
