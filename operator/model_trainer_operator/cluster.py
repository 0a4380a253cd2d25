"""The Kubernetes API calls the operator makes, through the official client. Everything returned
is plain JSON-like data; the untyped client does not leak past this module."""

from __future__ import annotations

import json
from collections.abc import Mapping

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from model_trainer.api import GROUP, VERSION
from model_trainer_operator.kinds import Kind
from model_trainer_operator.pods import LABEL_UID

JsonDict = dict[str, object]


class CreateRejected(Exception):
    """The API server refused a pod for good (invalid, or forbidden by policy)."""


def load_config() -> None:
    """In-cluster credentials in a pod, else the kubeconfig (KUBECONFIG)."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()


def _as_dict(value: object) -> JsonDict:
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    return {}


class Cluster:
    def __init__(self) -> None:
        self._api = k8s.ApiClient()
        self._core = k8s.CoreV1Api(self._api)
        self._custom = k8s.CustomObjectsApi(self._api)

    def create_pod(self, manifest: JsonDict) -> bool:
        """Create the pod; False when it exists already."""
        metadata = _as_dict(manifest.get("metadata"))
        pod = k8s.V1Pod.from_dict(manifest)
        if pod is None:
            raise CreateRejected("empty pod manifest")
        try:
            self._core.create_namespaced_pod(str(metadata["namespace"]), pod)
        except ApiException as exc:
            if exc.status == 409:
                return False
            if exc.status in (400, 403, 422):
                raise CreateRejected(_api_message(exc)) from None
            raise
        return True

    def read_pod(self, namespace: str, name: str) -> JsonDict | None:
        try:
            pod = self._core.read_namespaced_pod(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return _as_dict(json.loads(pod.to_json()))

    def list_pods(self, namespace: str, uid: str) -> list[JsonDict]:
        pods = self._core.list_namespaced_pod(namespace, label_selector=f"{LABEL_UID}={uid}")
        return [_as_dict(json.loads(pod.to_json())) for pod in pods.items]

    def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> bool:
        try:
            self._core.delete_namespaced_pod(
                name, namespace, grace_period_seconds=grace_seconds, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def delete_resource(self, kind: Kind, namespace: str, name: str) -> None:
        try:
            self._custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, kind.plural, name
            )
        except ApiException as exc:
            if exc.status != 404:
                raise


def _api_message(exc: ApiException) -> str:
    body = exc.body
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    try:
        parsed = json.loads(text)
    except ValueError:
        return text or str(exc.reason)
    message = parsed.get("message") if isinstance(parsed, dict) else None
    return str(message) if message else text
