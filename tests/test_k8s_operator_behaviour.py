"""Focused behaviours of the operator against the real API server and Redis: the pod it makes,
how it reads pod failures, deadlines, TTLs, dependencies, cancellation, events, metrics, the
status throttle, its RBAC and on-demand evaluation. The end-to-end flows are in
test_k8s_operator_flows.py."""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from kubernetes import client, watch
from kubernetes.client import ApiException

from controlplane import client_from_kubeconfig
from lm_support import corpus_text
from model_trainer import protocol
from model_trainer.api import Progress
from operator_support import (
    GROUP,
    OPERATOR_NAMESPACE,
    OPERATOR_SA,
    PLURALS,
    VERSION,
    Cluster,
    pod_env,
    run_pod_locally,
    wait_for,
)

pytestmark = pytest.mark.k8s

CORPUS = {"configMapRef": {"name": "corpus", "key": "text"}}
TOKENIZER_SPEC = {"algorithm": "bpe", "vocabSize": 400, "corpus": CORPUS, "holdoutFraction": 0.1}
RUN_SPEC = {
    "tokenizerRef": {"name": "tok"},
    "corpus": CORPUS,
    "holdoutFraction": 0.1,
    "model": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "contextLength": 32},
    "training": {
        "maxSteps": 6,
        "batchSize": 4,
        "warmupSteps": 1,
        "evalEvery": 6,
        "checkpointEvery": 6,
        "learningRate": 0.003,
    },
    "evaluation": {"maxTokens": 256, "samplePrompts": ["The "], "sampleMaxNewTokens": 4},
}
ATTEMPT = "modeltrainer.io/attempt"
SA_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}"
SA_GROUPS = ["system:serviceaccounts", f"system:serviceaccounts:{OPERATOR_NAMESPACE}"]


# -- helpers -----------------------------------------------------------------------------------


def uid_of(obj) -> str:
    return str(obj["metadata"]["uid"])


def start_job(cluster: Cluster, name: str, **spec: object):
    """A TokenizerJob and its first pod, already Running (the pod, not a trainer)."""
    uid = uid_of(cluster.create("TokenizerJob", name, {**TOKENIZER_SPEC, **spec}))
    pod = cluster.wait_pod(uid, timeout=15)
    cluster.set_pod_phase(pod.metadata.name, "Running")
    return uid, pod


def pod_exists(cluster: Cluster, name: str) -> bool:
    try:
        cluster.core.read_namespaced_pod(name, cluster.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def condition(status, type_: str):
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def reasons(cluster: Cluster, name: str) -> dict[str, str]:
    """Event reason -> type, of the events about the object named `name`."""
    return {e.reason: e.type for e in cluster.events(name)}


def wait_events(cluster: Cluster, name: str, *wanted: str) -> dict[str, str]:
    try:
        return wait_for(
            f"events {wanted} on {name}",
            lambda: (lambda found: found if set(wanted) <= set(found) else None)(
                reasons(cluster, name)
            ),
            timeout=5,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; events now: {reasons(cluster, name)}") from None


def wait_gone(cluster: Cluster, kind: str, name: str, timeout: float) -> None:
    wait_for(f"{kind} {name} to be deleted", lambda: cluster.get(kind, name) is None, timeout)


def seconds(timestamp: str) -> float:
    """Unix time of an RFC 3339 timestamp of the API (whole seconds, UTC)."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def make_corpus(cluster: Cluster, chars: int = 20_000) -> dict[str, dict[str, str]]:
    text = corpus_text(chars)
    cluster.core.create_namespaced_config_map(
        cluster.namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="corpus"), data={"text": text}),
    )
    return {"corpus": {"text": text}}


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=2) as response:
        return int(response.status), response.read().decode()


class ResourceWatch:
    """Every version of one resource the API server sends, timestamped on arrival. Watches in
    one-second slices, each resuming where the last ended, so that it stops promptly."""

    def __init__(self, cluster: Cluster, kind: str, name: str) -> None:
        self.cluster, self.kind, self.name = cluster, kind, name
        self.versions: list[tuple[float, str, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        body = cluster.get(kind, name)
        assert body is not None
        self._rv: str = body["metadata"]["resourceVersion"]

    def _run(self) -> None:
        while not self._stop.is_set():
            for event in watch.Watch().stream(
                self.cluster.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.cluster.namespace,
                PLURALS[self.kind],
                field_selector=f"metadata.name={self.name}",
                resource_version=self._rv,
                timeout_seconds=1,
            ):
                obj = event["object"]
                self._rv = obj["metadata"]["resourceVersion"]
                self.versions.append((time.monotonic(), self._rv, obj.get("status") or {}))

    def __enter__(self) -> ResourceWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, start: float, end: float) -> list[tuple[float, str, object]]:
        return [v for v in self.versions if start <= v[0] <= end]


# -- the pod -----------------------------------------------------------------------------------


def test_pod_spec_is_locked_down_and_follows_spec_and_settings(cluster: Cluster, start_operator):
    defaults = {"requests": {"cpu": "250m", "memory": "300Mi"}, "limits": {"memory": "1Gi"}}
    start_operator(
        artifacts_claim="shared-artifacts", image_pull_policy="Never", default_resources=defaults
    )
    custom = {"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"cpu": "4", "memory": "6Gi"}}
    plain_uid = uid_of(cluster.create("TokenizerJob", "plain", TOKENIZER_SPEC))
    own = cluster.create(
        "TokenizerJob",
        "own",
        {
            **TOKENIZER_SPEC,
            "image": "example/trainer:9",
            "imagePullPolicy": "Always",
            "resources": custom,
        },
    )
    own_uid = uid_of(own)
    plain = cluster.wait_pod(plain_uid, timeout=15)
    mine = cluster.wait_pod(own_uid, timeout=15)

    assert plain.metadata.name == f"plain-{plain_uid.replace('-', '')[:8]}-1"
    assert mine.metadata.name == f"own-{own_uid.replace('-', '')[:8]}-1"
    assert (
        plain.metadata.labels.items()
        >= {
            "app.kubernetes.io/component": "trainer",
            "app.kubernetes.io/managed-by": "model-trainer-operator",
            "modeltrainer.io/kind": "TokenizerJob",
            "modeltrainer.io/name": "plain",
            "modeltrainer.io/uid": plain_uid,
            "modeltrainer.io/attempt": "1",
        }.items()
    )
    (owner,) = plain.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (
        "TokenizerJob",
        "plain",
        plain_uid,
        True,
    )
    assert owner.api_version == f"{GROUP}/{VERSION}"

    spec = plain.spec
    assert spec.restart_policy == "Never"
    assert spec.automount_service_account_token is False
    assert spec.security_context.run_as_non_root is True
    assert spec.security_context.seccomp_profile.type == "RuntimeDefault"
    (container,) = spec.containers
    ctx = container.security_context
    assert ctx.run_as_non_root is True
    assert ctx.read_only_root_filesystem is True
    assert ctx.allow_privilege_escalation is False
    assert ctx.capabilities.drop == ["ALL"]
    assert not ctx.privileged

    volumes = {v.name: v for v in spec.volumes}
    writable = {m.mount_path: volumes[m.name] for m in container.volume_mounts if not m.read_only}
    assert sorted(writable) == ["/artifacts", "/tmp"]
    assert writable["/artifacts"].persistent_volume_claim.claim_name == "shared-artifacts"
    assert writable["/tmp"].empty_dir is not None
    (corpus_mount,) = [m for m in container.volume_mounts if m.read_only]
    assert volumes[corpus_mount.name].config_map.name == "corpus"
    assert corpus_mount.mount_path.endswith("/corpus")
    env = pod_env(plain)
    assert env["MT_ATTEMPT"] == "1"
    assert corpus_mount.mount_path.startswith(env["MT_CONFIGMAP_DIR"])
    assert json.loads(env["MT_RESOURCE"])["metadata"]["uid"] == plain_uid

    # Operator settings where the spec says nothing, the spec where it does.
    assert (container.image, container.image_pull_policy) == ("model-trainer/trainer:test", "Never")
    assert container.resources.requests == defaults["requests"]
    assert container.resources.limits == defaults["limits"]
    (own_container,) = mine.spec.containers
    assert (own_container.image, own_container.image_pull_policy) == ("example/trainer:9", "Always")
    assert own_container.resources.requests == custom["requests"]
    assert own_container.resources.limits == custom["limits"]


# -- failures of the pod -----------------------------------------------------------------------


def test_oom_killed_pod_fails_the_job_with_a_warning(cluster: Cluster, start_operator):
    start_operator()
    uid, pod = start_job(cluster, "oom", backoffLimit=0)
    cluster.set_pod_phase(pod.metadata.name, "Failed", exit_code=137, reason="OOMKilled")
    status = cluster.wait_phase("TokenizerJob", "oom", "Failed", timeout=10)
    assert status["reason"] == "OOMKilled"
    assert status["attempts"] == 1
    assert wait_events(cluster, "oom", "OOMKilled")["OOMKilled"] == "Warning"
    assert [p.metadata.name for p in cluster.owned_pods(uid)] == [pod.metadata.name]


def test_pod_deleted_while_running_is_replaced_or_fails_without_retries(
    cluster: Cluster, start_operator
):
    start_operator()
    retried_uid, first = start_job(cluster, "retried", backoffLimit=1)
    final_uid, only = start_job(cluster, "final", backoffLimit=0)
    cluster.core.delete_namespaced_pod(first.metadata.name, cluster.namespace)
    cluster.core.delete_namespaced_pod(only.metadata.name, cluster.namespace)

    (second,) = wait_for(
        "the pod of attempt 2",
        lambda: cluster.pods(**{"modeltrainer.io/uid": retried_uid, ATTEMPT: "2"}),
        timeout=10,
    )
    assert second.metadata.name == first.metadata.name[:-1] + "2"
    assert pod_env(second)["MT_ATTEMPT"] == "2"
    wait_for(
        "status.attempts == 2",
        lambda: cluster.status("TokenizerJob", "retried").get("attempts") == 2,
        timeout=10,
    )
    assert cluster.status("TokenizerJob", "retried")["phase"] == "Pending"

    status = cluster.wait_phase("TokenizerJob", "final", "Failed", timeout=10)
    assert status["reason"] in ("PodVanished", "PodDeleted")
    assert "disappeared" in status["message"] or "deleted" in status["message"]
    assert status["attempts"] == 1
    assert cluster.owned_pods(final_uid) == []


def test_invalid_input_exit_code_is_not_retried(cluster: Cluster, start_operator):
    start_operator()
    uid, pod = start_job(cluster, "bad", backoffLimit=2)
    cluster.set_pod_phase(pod.metadata.name, "Failed", exit_code=2, message="corpus is empty")
    status = cluster.wait_phase("TokenizerJob", "bad", "Failed", timeout=10)
    assert status["reason"] == "InvalidInput"
    assert "corpus is empty" in status["message"]
    time.sleep(1.5)  # three reconcile intervals: no second attempt may appear
    assert len(cluster.owned_pods(uid)) == 1
    assert cluster.status("TokenizerJob", "bad")["attempts"] == 1


def test_active_deadline_fails_the_job_and_deletes_its_pod(
    cluster: Cluster, start_operator, redis_client
):
    start_operator()
    uid, pod = start_job(cluster, "slow", activeDeadlineSeconds=3)
    protocol.write_heartbeat(redis_client, uid)
    cluster.wait_phase("TokenizerJob", "slow", "Running", timeout=10)
    status = cluster.wait_phase("TokenizerJob", "slow", "Failed", timeout=10)
    assert status["reason"] == "DeadlineExceeded"
    assert seconds(status["completionTime"]) - seconds(status["startTime"]) >= 3
    wait_for("the pod to be deleted", lambda: not pod_exists(cluster, pod.metadata.name), 5)
    assert len(cluster.owned_pods(uid)) == 0


# -- TTL after finishing -------------------------------------------------------------------------


def test_ttl_deletes_a_finished_job_also_across_an_operator_restart(
    cluster: Cluster, start_operator
):
    operator = start_operator()
    uid, pod = start_job(cluster, "short", ttlSecondsAfterFinished=2)
    cluster.set_pod_phase(pod.metadata.name, "Succeeded", exit_code=0)
    finished = seconds(cluster.wait_phase("TokenizerJob", "short", "Succeeded")["completionTime"])
    wait_gone(cluster, "TokenizerJob", "short", timeout=8)
    assert time.time() - finished >= 2  # completionTime is whole seconds: never early
    assert wait_events(cluster, "short", "TTLExpired")["TTLExpired"] == "Normal"
    assert cluster.owned_pods(uid) == []

    ttl = 6
    uid, pod = start_job(cluster, "kept", ttlSecondsAfterFinished=ttl)
    cluster.set_pod_phase(pod.metadata.name, "Succeeded", exit_code=0)
    finished = seconds(cluster.wait_phase("TokenizerJob", "kept", "Succeeded")["completionTime"])
    operator.stop()
    time.sleep(max(0.0, finished + ttl + 1 - time.time()))
    assert cluster.get("TokenizerJob", "kept") is not None  # nobody else deletes it
    start_operator()
    # Gone well before a fresh ttl would end: it is counted from status.completionTime.
    wait_gone(cluster, "TokenizerJob", "kept", timeout=4)
    assert cluster.owned_pods(uid) == []


# -- dependencies ------------------------------------------------------------------------------


def test_training_run_fails_on_a_missing_or_failed_tokenizer(cluster: Cluster, start_operator):
    start_operator(tokenizer_grace_seconds="3")
    orphan = cluster.create("TrainingRun", "orphan", {**RUN_SPEC, "tokenizerRef": {"name": "no"}})
    pending = cluster.wait_phase("TrainingRun", "orphan", "Pending", timeout=2.5)
    ready = condition(pending, "TokenizerReady")
    assert ready is not None and ready["status"] == "False"
    assert ready["reason"] == "TokenizerNotFound"

    _, pod = start_job(cluster, "tok", backoffLimit=0)
    cluster.set_pod_phase(pod.metadata.name, "Failed", exit_code=1, message="boom")
    cluster.wait_phase("TokenizerJob", "tok", "Failed", timeout=10)
    run_uid = uid_of(cluster.create("TrainingRun", "run", RUN_SPEC))
    status = cluster.wait_phase("TrainingRun", "run", "Failed", timeout=10)
    assert status["reason"] == "TokenizerFailed"
    assert condition(status, "TokenizerReady")["reason"] == "TokenizerFailed"
    assert cluster.owned_pods(run_uid) == []

    failed = cluster.wait_phase("TrainingRun", "orphan", "Failed", timeout=8)
    assert failed["reason"] == "TokenizerNotFound"
    created = seconds(orphan["metadata"]["creationTimestamp"])
    assert seconds(failed["completionTime"]) - created >= 3  # not before the grace
    assert cluster.owned_pods(uid_of(orphan)) == []


# -- cancellation ------------------------------------------------------------------------------


def test_cancel_through_redis_or_spec(cluster: Cluster, start_operator, redis_client):
    start_operator(cancel_grace_seconds="4")
    uid, pod = start_job(cluster, "stuck")
    protocol.write_heartbeat(redis_client, uid)
    cluster.wait_phase("TokenizerJob", "stuck", "Running", timeout=10)
    waiting_uid = uid_of(cluster.create("TrainingRun", "waiting", RUN_SPEC))

    # A trainer that ignores the Redis cancel key gets the grace, then loses its pod.
    protocol.request_cancel(redis_client, uid)
    asked = time.monotonic()

    def cancel_requested_while_running():
        status = cluster.status("TokenizerJob", "stuck")
        cond = condition(status, "CancelRequested")
        running = status.get("phase") == "Running"
        return status if running and cond is not None and cond["status"] == "True" else None

    wait_for("CancelRequested while Running", cancel_requested_while_running, timeout=3)
    assert pod_exists(cluster, pod.metadata.name)

    # spec.cancel of a run still waiting for its tokenizer: Cancelled at once, and Redis told.
    waiting = cluster.wait_phase("TrainingRun", "waiting", "Pending", timeout=3)
    assert waiting["reason"] == "WaitingForTokenizer"
    assert not protocol.cancel_requested(redis_client, waiting_uid)
    cluster.patch_spec("TrainingRun", "waiting", {"cancel": True})
    status = cluster.wait_phase("TrainingRun", "waiting", "Cancelled", timeout=3)
    assert status["reason"] == "Cancelled"
    assert protocol.cancel_requested(redis_client, waiting_uid)
    assert cluster.owned_pods(waiting_uid) == []

    protocol.write_heartbeat(redis_client, uid)
    status = cluster.wait_phase("TokenizerJob", "stuck", "Cancelled", timeout=8)
    assert time.monotonic() - asked > 2.5
    assert status["reason"] == "CancelGracePeriodExceeded"
    assert not pod_exists(cluster, pod.metadata.name)
    assert wait_events(cluster, "stuck", "CancelRequested")["CancelRequested"] == "Normal"


# -- events, printer columns, metrics --------------------------------------------------------


def test_a_finished_job_shows_in_events_printer_columns_and_metrics(
    cluster: Cluster, start_operator, redis_client
):
    operator = start_operator()
    uid, pod = start_job(cluster, "seen")
    protocol.write_heartbeat(redis_client, uid)
    protocol.write_progress(redis_client, uid, Progress(step=3, total_steps=4, percent=75))
    cluster.wait_phase("TokenizerJob", "seen", "Running", timeout=10)
    cluster.set_pod_phase(pod.metadata.name, "Succeeded", exit_code=0)
    cluster.wait_phase("TokenizerJob", "seen", "Succeeded", timeout=10)
    events = wait_events(cluster, "seen", "PodCreated", "Training", "Succeeded")
    assert set(events.values()) == {"Normal"}
    (one,) = [e for e in cluster.events("seen") if e.reason == "Succeeded"]
    assert one.involved_object.kind == "TokenizerJob"
    assert one.involved_object.uid == uid
    assert one.message.startswith("Succeeded")

    extensions = client.ApiextensionsV1Api(cluster.api)
    for kind, expected in (
        ("TokenizerJob", ["Phase", "Progress %", "Age"]),
        ("TrainingRun", ["Phase", "Progress %", "Loss", "Age"]),
    ):
        crd = extensions.read_custom_resource_definition(f"{PLURALS[kind]}.{GROUP}")
        (version,) = [v for v in crd.spec.versions if v.served]
        names = [c.name for c in version.additional_printer_columns or []]
        assert set(expected) <= set(names), names
    # What `kubectl get tokenizerjobs` shows: the server fills the columns in.
    table = table_of(cluster, "tokenizerjobs")
    columns = [c["name"] for c in table["columnDefinitions"]]
    (row,) = [r for r in table["rows"] if r["cells"][0] == "seen"]
    assert row["cells"][columns.index("Phase")] == "Succeeded"
    assert row["cells"][columns.index("Progress %")] == 75

    metrics = operator.metrics()
    assert 'modeltrainer_jobs{kind="TokenizerJob",phase="Succeeded"} 1.0' in metrics
    assert 'modeltrainer_jobs{kind="TokenizerJob",phase="Running"} 0.0' in metrics
    assert 'modeltrainer_pods_created_total{kind="TokenizerJob",role="trainer"} 1.0' in metrics
    assert "modeltrainer_reconcile_errors_total" in metrics
    assert 'modeltrainer_reconcile_errors_total{kind="TokenizerJob"} 0.0' in metrics
    assert http_get(f"http://127.0.0.1:{operator.health_port}/healthz")[0] == 200


def table_of(cluster: Cluster, plural: str):
    method, url, headers, _, _ = cluster.api.param_serialize(
        "GET",
        f"/apis/{GROUP}/{VERSION}/namespaces/{cluster.namespace}/{plural}",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"],
    )
    response = cluster.api.call_api(method, url, header_params=headers)
    response.read()
    return json.loads(response.data or b"")


# -- status throttle ---------------------------------------------------------------------------


def test_status_patches_are_throttled_and_stop_when_nothing_changes(
    cluster: Cluster, start_operator, redis_client
):
    # Reconcile often, so that only the throttle keeps patches to one a second.
    start_operator(reconcile_interval_seconds="0.1", heartbeat_timeout_seconds="60")
    uid, _ = start_job(cluster, "busy")
    protocol.write_heartbeat(redis_client, uid)
    cluster.wait_phase("TokenizerJob", "busy", "Running", timeout=10)
    time.sleep(1.2)
    with ResourceWatch(cluster, "TokenizerJob", "busy") as seen:
        started = time.monotonic()
        for step in range(1, 21):
            # Heartbeat first: a tick that sees the last progress sees the last heartbeat too.
            protocol.write_heartbeat(redis_client, uid)
            protocol.write_progress(
                redis_client, uid, Progress(step=step, total_steps=20, percent=step * 5)
            )
            time.sleep(0.1)
        wait_for(
            "the last progress in status",
            lambda: (
                (cluster.status("TokenizerJob", "busy").get("progress") or {}).get("step") == 20
            ),
            timeout=3,
        )
        settled = time.monotonic()
        time.sleep(3)
        quiet = time.monotonic()
    during = seen.between(started, settled)
    times = [t for t, _, _ in during]
    assert 1 <= len(during) <= (settled - started) + 1, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap > 0.5 for gap in gaps), gaps  # unthrottled, they are ~0.1 s
    assert seen.between(settled + 0.3, quiet) == []  # nothing changed: nothing sent
    assert cluster.status("TokenizerJob", "busy")["progress"]["percent"] == 100


# -- RBAC --------------------------------------------------------------------------------------


def access(cluster: Cluster, verb: str, resource: str, group: str = "", **extra: str):
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=SA_USER,
            groups=[*SA_GROUPS, "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, resource=resource, group=group, **extra
            ),
        )
    )
    result = client.AuthorizationV1Api(cluster.api).create_subject_access_review(review)
    return result.status is not None and result.status.allowed is True


@pytest.mark.parametrize(
    ("verb", "resource", "group", "extra"),
    [
        ("get", "secrets", "", {"namespace": "NS"}),
        ("list", "secrets", "", {}),
        ("watch", "secrets", "", {"namespace": "NS"}),
        ("create", "clusterroles", "rbac.authorization.k8s.io", {}),
        ("create", "rolebindings", "rbac.authorization.k8s.io", {"namespace": "NS"}),
        ("create", "pods", "", {"namespace": "NS", "subresource": "exec"}),
        ("update", "pods", "", {"namespace": "NS"}),
        ("create", "trainingruns", GROUP, {"namespace": "NS"}),
        ("update", "customresourcedefinitions", "apiextensions.k8s.io", {}),
    ],
)
def test_operator_service_account_cannot(
    cluster: Cluster, operator_kubeconfig, verb, resource, group, extra
):
    extra = {k: cluster.namespace if v == "NS" else v for k, v in extra.items()}
    assert not access(cluster, verb, resource, group, **extra)


def test_operator_service_account_can_do_its_job_and_no_more(cluster: Cluster, operator_kubeconfig):
    ns = cluster.namespace
    needed = [
        ("create", "pods", "", {"namespace": ns}),
        ("delete", "pods", "", {"namespace": ns}),
        ("watch", "pods", "", {}),
        ("watch", "trainingruns", GROUP, {}),
        ("patch", "trainingruns", GROUP, {"namespace": ns, "subresource": "status"}),
        ("patch", "tokenizerjobs", GROUP, {"namespace": ns, "subresource": "status"}),
        ("delete", "tokenizerjobs", GROUP, {"namespace": ns}),
        ("create", "events", "", {"namespace": ns}),
    ]
    missing = [(v, r, g, e) for v, r, g, e in needed if not access(cluster, v, r, g, **e)]
    assert missing == []
    # The same, lived: the ServiceAccount's own credentials are refused the Secrets.
    with client_from_kubeconfig(operator_kubeconfig) as api:
        with pytest.raises(ApiException) as refused:
            client.CoreV1Api(api).list_namespaced_secret(ns)
        assert refused.value.status == 403
        client.CoreV1Api(api).list_namespaced_pod(ns)


# -- on-demand evaluation ----------------------------------------------------------------------


def test_evaluation_added_after_success_runs_its_own_pod(
    cluster: Cluster, start_operator, tmp_path: Path
):
    start_operator()
    config_maps = make_corpus(cluster, 12_000)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for kind, name, spec in (
        ("TokenizerJob", "tok", TOKENIZER_SPEC),
        ("TrainingRun", "run", RUN_SPEC),
    ):
        uid = uid_of(cluster.create(kind, name, spec))
        pod = cluster.wait_pod(uid, timeout=15)
        cluster.set_pod_phase(pod.metadata.name, "Running")
        assert run_pod_locally(pod, artifacts, config_maps).returncode == 0
        cluster.set_pod_phase(pod.metadata.name, "Succeeded", exit_code=0)
        cluster.wait_phase(kind, name, "Succeeded", timeout=10)
    run_uid = uid

    cluster.patch_spec(
        "TrainingRun",
        "run",
        {"evaluations": [{"name": "holdout2", "split": "train", "maxTokens": 256}]},
    )
    (eval_pod,) = wait_for(
        "the evaluation pod",
        lambda: cluster.pods(**{"modeltrainer.io/evaluation": "holdout2"}),
        timeout=10,
    )
    assert eval_pod.metadata.labels["modeltrainer.io/uid"] == run_uid
    assert eval_pod.metadata.labels["app.kubernetes.io/component"] == "evaluation"
    assert pod_env(eval_pod)["MT_EVALUATION"] == "holdout2"
    assert (
        len([p for p in cluster.owned_pods(run_uid) if p.metadata.name != eval_pod.metadata.name])
        == 1
    )
    cluster.set_pod_phase(eval_pod.metadata.name, "Running")
    assert run_pod_locally(eval_pod, artifacts, config_maps).returncode == 0
    cluster.set_pod_phase(eval_pod.metadata.name, "Succeeded", exit_code=0)

    def evaluated():
        results = cluster.status("TrainingRun", "run").get("evaluations") or []
        return results[0] if results and results[0].get("phase") == "Succeeded" else None

    result = wait_for("evaluation holdout2 to succeed", evaluated, timeout=10)
    assert result["name"] == "holdout2"
    assert result["path"] == "eval/holdout2/metrics.json"
    assert result["metrics"]["loss"] > 0
    assert 0 < result["metrics"]["tokens"] <= 256
    run_dir = artifacts / cluster.namespace / "trainingruns" / "run"
    written = json.loads((run_dir / result["path"]).read_text())
    assert written  # the file the status points at
    assert cluster.status("TrainingRun", "run")["phase"] == "Succeeded"


def test_without_redis_the_pods_still_decide_and_deletion_is_not_held_up(
    cluster: Cluster, start_operator
):
    start_operator(REDIS_URL="redis://127.0.0.1:1/0")  # nothing listens there
    uid, pod = start_job(cluster, "noredis")
    cluster.set_pod_phase(pod.metadata.name, "Running")
    cluster.wait_phase("TokenizerJob", "noredis", "Running")
    time.sleep(6)  # past the 4 s heartbeat timeout: silence means nothing without Redis
    status = cluster.status("TokenizerJob", "noredis")
    assert status["phase"] == "Running"
    assert not any(c["type"] == "HeartbeatLost" for c in status.get("conditions", []))
    cluster.set_pod_phase(pod.metadata.name, "Succeeded", exit_code=0)
    cluster.wait_phase("TokenizerJob", "noredis", "Succeeded")

    started = time.monotonic()
    cluster.delete("TokenizerJob", "noredis")
    wait_for("the deletion", lambda: cluster.get("TokenizerJob", "noredis") is None, timeout=40)
    assert time.monotonic() - started < 30
    assert cluster.owned_pods(uid) == []
