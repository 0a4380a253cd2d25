"""The operator under test: run as a real process with its ServiceAccount's RBAC, against the
real control plane, and play the trainer pods' life (there is no kubelet here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import yaml
from kubernetes import client, utils
from kubernetes.client import ApiException

from controlplane import ControlPlane, free_port

ROOT = Path(__file__).resolve().parent.parent
RBAC_FILE = ROOT / "operator" / "deploy" / "rbac.yaml"
OPERATOR_NAMESPACE = "model-trainer-system"
OPERATOR_SA = "model-trainer-operator"
GROUP, VERSION = "modeltrainer.io", "v1alpha1"
PLURALS = {"TokenizerJob": "tokenizerjobs", "TrainingRun": "trainingruns"}
T = TypeVar("T")


def install_rbac(plane: ControlPlane) -> None:
    """Apply operator/deploy/rbac.yaml as it is: the operator gets exactly these rules."""
    docs = [d for d in yaml.safe_load_all(RBAC_FILE.read_text()) if d]
    with plane.api_client() as api:
        core = client.CoreV1Api(api)
        try:
            core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=OPERATOR_NAMESPACE))
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
        for doc in docs:
            try:
                utils.create_from_dict(api, doc)
            except utils.FailToCreateError as exc:
                if not all(e.status == 409 for e in exc.api_exceptions):
                    raise


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class OperatorProcess:
    """`python -m model_trainer_operator` in a subprocess, authenticated as its ServiceAccount."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        redis_url: str,
        log_path: Path,
        **settings: object,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.env = dict(os.environ)
        self.env.update(
            {
                "KUBECONFIG": str(kubeconfig),
                "MT_OPERATOR_REDIS_URL": redis_url,
                "MT_OPERATOR_METRICS_PORT": str(self.metrics_port),
                "MT_OPERATOR_HEALTH_PORT": str(self.health_port),
                "MT_OPERATOR_TRAINER_IMAGE": "model-trainer/trainer:test",
            }
        )
        for key, value in settings.items():
            self.env[f"MT_OPERATOR_{key.upper()}"] = (
                value if isinstance(value, str) else json.dumps(value)
            )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "model_trainer_operator", "--namespace", self.namespace],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log.close()
        wait_for("the operator's liveness endpoint", self.healthy, timeout=60)

    def healthy(self) -> bool:
        import urllib.request

        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"operator exited:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/healthz", timeout=1
            ) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2
        ) as response:
            return str(response.read().decode())

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to tidy up."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Cluster:
    """Admin-side helpers for tests: create resources, read status, play pods."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def create(self, kind: str, name: str, spec: Mapping[str, object]):
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name},
            "spec": dict(spec),
        }
        return self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURALS[kind], body
        )

    def get(self, kind: str, name: str):
        try:
            return self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURALS[kind], name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def status(self, kind: str, name: str):
        body = self.get(kind, name) or {}
        status = body.get("status")
        return status if isinstance(status, dict) else {}

    def patch_spec(self, kind: str, name: str, spec: Mapping[str, object]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURALS[kind], name, {"spec": dict(spec)}
        )

    def delete(self, kind: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURALS[kind], name
        )

    def wait_phase(self, kind: str, name: str, phase: str, timeout: float = 30.0):
        def probe():
            status = self.status(kind, name)
            return status if status.get("phase") == phase else None

        try:
            return wait_for(f"{kind} {name} to be {phase}", probe, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; status now: {self.status(kind, name)}") from None

    def pods(self, **labels: str):
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        return self.core.list_namespaced_pod(self.namespace, label_selector=selector or None).items

    def owned_pods(self, uid: str):
        return sorted(self.pods(**{"modeltrainer.io/uid": uid}), key=lambda p: p.metadata.name)

    def wait_pod(self, uid: str, count: int = 1, timeout: float = 30.0):
        pods = wait_for(
            f"{count} pod(s) of {uid}",
            lambda: (lambda found: found if len(found) >= count else None)(self.owned_pods(uid)),
            timeout,
        )
        return sorted(pods, key=lambda p: int(p.metadata.labels["modeltrainer.io/attempt"]))[
            count - 1
        ]

    def set_pod_phase(
        self,
        name: str,
        phase: str,
        exit_code: int | None = None,
        reason: str = "",
        message: str = "",
    ) -> None:
        """Play the kubelet: write the pod's phase and its container's state."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        container: dict[str, object] = {
            "name": "trainer",
            "image": "model-trainer/trainer:test",
            "imageID": "",
            "ready": phase == "Running",
            "restartCount": 0,
        }
        if exit_code is None:
            container["state"] = (
                {"running": {"startedAt": now}}
                if phase == "Running"
                else {"waiting": {"reason": reason or "ContainerCreating"}}
            )
        else:
            container["state"] = {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                    "message": message,
                    "startedAt": now,
                    "finishedAt": now,
                }
            }
        status = {"phase": phase, "startTime": now, "containerStatuses": [container]}
        self.core.patch_namespaced_pod_status(name, self.namespace, {"status": status})

    def events(self, name: str):
        return self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        ).items


def pod_env(pod) -> dict[str, str]:
    container = pod.spec.containers[0]
    return {e.name: e.value for e in container.env or [] if e.value is not None}


def run_pod_locally(
    pod,
    artifacts: Path,
    config_maps: Mapping[str, Mapping[str, str]] | None = None,
    *,
    wait: bool = True,
) -> subprocess.Popen[bytes]:
    """Run the pod's container command as a local process: its env, with the artifacts volume
    and the ConfigMap mounts mapped to folders under `artifacts`'s parent."""
    env = dict(os.environ)
    env.update(pod_env(pod))
    env["MT_ARTIFACTS_DIR"] = str(artifacts)
    cm_root = artifacts.parent / "configmaps"
    for name, data in (config_maps or {}).items():
        for key, value in data.items():
            (cm_root / name).mkdir(parents=True, exist_ok=True)
            (cm_root / name / key).write_text(value)
    env["MT_CONFIGMAP_DIR"] = str(cm_root)
    env["HOME"] = str(artifacts.parent)
    env["MT_NUM_THREADS"] = "1"
    command = pod.spec.containers[0].command
    assert command[0] == "model-trainer"
    log = (artifacts.parent / f"{pod.metadata.name}.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "model_trainer", *command[1:]],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    if wait:
        process.wait(timeout=600)
    return process


def iter_lines(path: Path) -> Iterator[str]:
    yield from path.read_text().splitlines()
