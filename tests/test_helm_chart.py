"""The Helm chart helm/model-trainer and the kubectl bundle rendered from it.

Every values combination is linted, rendered and applied to a real kube-apiserver in a namespace
that enforces the restricted Pod Security Standard; the rendered objects are checked against the
operator's own settings, its RBAC file and the repository's CRDs."""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import pytest
import yaml
from kubernetes import client, utils
from kubernetes.client import ApiException

from controlplane import ControlPlane
from model_trainer_operator.kinds import TOKENIZER_JOB, parse_resource
from model_trainer_operator.pods import LABEL_MANAGED_BY, MANAGED_BY, pod_manifest
from model_trainer_operator.settings import ENV_PREFIX, OperatorSettings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "model-trainer"
RBAC_FILE = ROOT / "operator" / "deploy" / "rbac.yaml"
BUNDLE = ROOT / "operator" / "deploy" / "install.yaml"
CRD_DIR = ROOT / "crds"
EXAMPLE_JOB = ROOT / "examples" / "demo" / "tokenizerjob.yaml"
KIND_VALUES = ROOT / "examples" / "kind-values.yaml"
RENDER_SCRIPT = ROOT / "scripts" / "render_manifests.sh"
BUNDLE_NAMESPACE = "model-trainer-system"
RESTRICTED = "restricted"
# A Redis of the user's own.
EXTERNAL_REDIS = "redis://redis.example.internal:6379/1"

Doc = dict[str, object]
# Helm, and Argo CD 2.8 and later, leave an object with this annotation behind on uninstall.
KEEP = {"helm.sh/resource-policy": "keep"}


def _doc(value: object) -> Doc:
    assert isinstance(value, dict), value
    return value


CASES: dict[str, Doc] = {
    "default": {},
    "external-redis": {
        "redis": {"enabled": False, "external": {"url": EXTERNAL_REDIS, "existingSecret": "ext"}}
    },
    "existing-claim": {"artifacts": {"existingClaim": "team-artifacts"}},
    "network-policies": {
        "networkPolicy": {
            "enabled": True,
            "artifactService": {"from": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]},
            "trainerEgress": {
                "enabled": True,
                "extraEgress": [{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]}],
            },
        }
    },
    "kind-host-path": {"artifacts": {"hostPath": "/var/lib/model-trainer/artifacts"}},
    # The values `make deploy` installs on kind.
    "kind-example": _doc(yaml.safe_load(KIND_VALUES.read_text())),
    "auth-off": {"artifactService": {"auth": {"enabled": False}}},
    "customized": {
        "imagePullSecrets": [{"name": "registry"}],
        "image": {"digest": "sha256:" + "ab" * 32},
        "operator": {
            "watchNamespaces": ["team-a", "team-b"],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "ml", "operator": "Exists", "effect": "NoSchedule"}],
            "podAnnotations": {"example.com/owner": "ml"},
            "timing": {"reconcileIntervalSeconds": 0.5, "podTerminationGraceSeconds": 90},
        },
        "trainer": {
            "image": {"tag": "0.1.0-cuda", "pullPolicy": "Always"},
            "serviceAccountName": "trainer",
            "defaultResources": {"requests": {"cpu": 2, "memory": "4Gi"}, "limits": {}},
        },
        "redis": {
            "auth": {"password": "correct horse battery"},
            "persistence": {"enabled": False},
        },
        "artifacts": {"storageClass": "-", "accessMode": "ReadWriteMany", "keep": False},
        "artifactService": {"auth": {"existingSecret": "artifact-token"}, "replicas": 2},
    },
}


# --- helpers -------------------------------------------------------------------------------


def _list(value: object) -> list[object]:
    assert isinstance(value, list), value
    return value


def _docs(value: object) -> list[Doc]:
    assert isinstance(value, list), value
    return [_doc(item) for item in value]


def _dig(value: object, *keys: str) -> object:
    for key in keys:
        value = _doc(value).get(key)
    return value


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)


def _values_file(tmp: Path, name: str, values: Doc) -> Path:
    path = tmp / f"{name}.values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


class Rendered:
    """The objects of one rendered release."""

    def __init__(self, release: str, namespace: str, text: str) -> None:
        self.release = release
        self.namespace = namespace
        self.text = text
        self.objects = [_doc(d) for d in yaml.safe_load_all(text) if d]

    def all(self, kind: str) -> list[Doc]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, suffix: str = "") -> Doc:
        name = f"{self.release}-model-trainer{suffix}"
        found = [o for o in self.all(kind) if _dig(o, "metadata", "name") == name]
        assert len(found) == 1, f"{kind} {name}: {[_dig(o, 'metadata', 'name') for o in found]}"
        return found[0]

    def has(self, kind: str) -> bool:
        return bool(self.all(kind))

    def operator_config(self) -> dict[str, str]:
        data = _doc(_dig(self.get("ConfigMap", "-operator"), "data"))
        return {key: str(value) for key, value in data.items()}

    def container(self, kind: str, suffix: str) -> Doc:
        return _docs(_dig(self.get(kind, suffix), "spec", "template", "spec", "containers"))[0]

    def workloads(self) -> list[Doc]:
        return [o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet")]


@pytest.fixture(scope="module")
def values_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm-values")


@pytest.fixture(scope="module")
def rendered(helm: str, values_dir: Path) -> dict[str, Rendered]:
    """Every case rendered once, each as its own release in its own namespace."""
    suffix = uuid.uuid4().hex[:6]
    out = {}
    for name, values in CASES.items():
        release = namespace = f"h{suffix}-{name}"
        path = _values_file(values_dir, name, values)
        result = _run(
            [helm, "template", release, str(CHART), "--namespace", namespace, "-f", str(path)]
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"
        out[name] = Rendered(release, namespace, result.stdout)
    return out


def _template_error(helm: str, values_dir: Path, values: Doc) -> str:
    path = _values_file(values_dir, "bad-" + uuid.uuid4().hex[:6], values)
    result = _run([helm, "template", "bad", str(CHART), "-f", str(path)])
    assert result.returncode != 0, f"accepted {values}"
    return result.stderr


# --- lint and schema -------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_lint_strict_passes_without_warnings(helm: str, values_dir: Path, name: str):
    path = _values_file(values_dir, f"lint-{name}", CASES[name])
    result = _run([helm, "lint", "--strict", str(CHART), "-f", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"trainer": {"image": {"pullPolicy": "always"}}}, "pullPolicy"),
        ({"artifacts": {"accessMode": "ReadOnlyMany"}}, "accessMode"),
        ({"artifacts": {"size": "ten gigs"}}, "size"),
        ({"operator": {"replicas": 2}}, "replicas"),
        ({"redis": {"auth": {"passwd": "x"}}}, "passwd"),
        ({"redis": {"enabled": False}}, "url"),
        ({"redis": {"enabled": False, "external": {"url": "redis.example:6379"}}}, "url"),
        ({"redis": {"auth": {"password": 'has"quote'}}}, "password"),
        ({"operator": {"resources": {"limits": {"memory": "lots"}}}}, "memory"),
        ({"operator": {"timing": {"reconcileIntervalSeconds": 0}}}, "reconcileIntervalSeconds"),
        ({"artifacts": {"hostPath": "relative/dir"}}, "hostPath"),
        ({"networkPolicy": {"enabled": "yes"}}, "enabled"),
    ],
)
def test_schema_rejects_bad_values(helm: str, values_dir: Path, values: Doc, complaint: str):
    error = _template_error(helm, values_dir, values)
    assert "schema" in error.lower() or "required" in error.lower(), error
    assert complaint in error, error


def _schema_keys(node: Doc, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The paths of the schema's own keys (not those of shared definitions or free maps)."""
    keys = set()
    for key, sub in _doc(node.get("properties", {})).items():
        keys.add((*prefix, key))
        keys |= _schema_keys(_doc(sub), (*prefix, key))
    return keys


def test_every_value_is_documented():
    schema = _doc(json.loads((CHART / "values.schema.json").read_text()))
    keys = _schema_keys(schema) - {("global",)}
    seen: set[tuple[str, ...]] = set()
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z][\w-]*):", line)
        if match:
            indent = len(match.group(1))
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, match.group(2))]
            path = tuple(k for _, k in stack)
            if path in keys:
                seen.add(path)
                assert previous.lstrip().startswith("#"), f"{'.'.join(path)} has no comment"
        if line.strip():
            previous = line
    assert seen == keys, f"in the schema but not in values.yaml: {sorted(keys - seen)}"


# --- rendered objects ------------------------------------------------------------------------


def test_crds_are_the_repository_crds():
    ours = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert ours == sorted(p.name for p in CRD_DIR.glob("*.yaml"))
    for name in ours:
        assert (CHART / "crds" / name).read_bytes() == (CRD_DIR / name).read_bytes(), (
            f"helm/model-trainer/crds/{name} differs from crds/{name}: run `make crds`"
        )


def test_cluster_role_has_exactly_the_rules_of_the_rbac_file(rendered):
    reference = {_doc(d)["kind"]: _doc(d) for d in yaml.safe_load_all(RBAC_FILE.read_text()) if d}
    for case in rendered.values():
        role = case.get("ClusterRole", "-operator")
        assert role["rules"] == reference["ClusterRole"]["rules"]
        # Nothing else grants the operator anything.
        assert [_dig(o, "metadata", "name") for o in case.all("ClusterRole")] == [
            _dig(role, "metadata", "name")
        ]
        assert not case.has("Role") and not case.has("RoleBinding")
        binding = case.get("ClusterRoleBinding", "-operator")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": _dig(role, "metadata", "name"),
        }
        account = case.get("ServiceAccount", "-operator")
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": _dig(account, "metadata", "name"),
                "namespace": case.namespace,
            }
        ]
        pod_spec = _dig(case.get("Deployment", "-operator"), "spec", "template", "spec")
        assert _dig(pod_spec, "serviceAccountName") == _dig(account, "metadata", "name")


def test_default_release_names_match_the_rbac_file(helm: str):
    """With release `model-trainer`, the chart's names are those of operator/deploy/rbac.yaml."""
    result = _run([helm, "template", "model-trainer", str(CHART), "-n", BUNDLE_NAMESPACE])
    assert result.returncode == 0, result.stderr
    ours = {
        (o["kind"], _dig(o, "metadata", "name"))
        for o in (_doc(d) for d in yaml.safe_load_all(result.stdout) if d)
    }
    for doc in (_doc(d) for d in yaml.safe_load_all(RBAC_FILE.read_text()) if d):
        assert (doc["kind"], _dig(doc, "metadata", "name")) in ours


def test_operator_settings_parse_and_every_variable_is_a_setting(rendered):
    for name, case in rendered.items():
        config = case.operator_config()
        for key in config:
            if key.startswith(ENV_PREFIX):
                assert key.removeprefix(ENV_PREFIX).lower() in OperatorSettings.model_fields, key
        settings = OperatorSettings.from_env(config)
        assert settings.metrics_port == 8080 and settings.health_port == 8081, name
    custom = OperatorSettings.from_env(rendered["customized"].operator_config())
    assert custom.namespaces == ["team-a", "team-b"]
    assert custom.trainer_image == "model-trainer/trainer:0.1.0-cuda"
    assert custom.image_pull_policy == "Always"
    assert custom.service_account == "trainer"
    assert custom.reconcile_interval_seconds == 0.5
    assert custom.pod_termination_grace_seconds == 90
    assert custom.default_resources.requests == {"cpu": "2", "memory": "4Gi"}
    default = OperatorSettings.from_env(rendered["default"].operator_config())
    assert default == OperatorSettings.from_env(
        {
            "MT_OPERATOR_REDIS_URL": default.redis_url,
            "MT_OPERATOR_REDIS_PASSWORD_SECRET": default.redis_password_secret or "",
        }
    ), "the chart's defaults differ from the operator's own"


def test_default_values_run_redis_across_namespaces(rendered):
    case = rendered["default"]
    release, namespace = case.release, case.namespace
    config = case.operator_config()
    secret = case.get("Secret", "-redis")
    redis_service = case.get("Service", "-redis")
    assert config["MT_OPERATOR_REDIS_URL"] == (
        f"redis://{_dig(redis_service, 'metadata', 'name')}.{namespace}.svc.cluster.local:6379/0"
    )
    assert config["MT_OPERATOR_REDIS_PASSWORD_SECRET"] == _dig(secret, "metadata", "name")
    assert "MT_OPERATOR_TRAINER_REDIS_URL" not in config
    password = _dig(secret, "data", "password")
    assert isinstance(password, str) and len(password) > 32
    # The password never appears in a pod spec, only references to its Secret.
    redis = case.get("StatefulSet", "-redis")
    assert password not in json.dumps(redis)
    container = case.container("StatefulSet", "-redis")
    refs = {
        _dig(e, "name"): _dig(e, "valueFrom", "secretKeyRef")
        for e in _docs(container["env"])
        if "valueFrom" in e
    }
    expected_ref = {"name": f"{release}-model-trainer-redis", "key": "password"}
    assert refs == {"REDIS_PASSWORD": expected_ref, "REDISCLI_AUTH": expected_ref}
    command = " ".join(str(c) for c in _list(container["command"]))
    assert "--appendonly yes" in command and "requirepass" in command
    assert _dig(redis, "spec", "volumeClaimTemplates") is not None
    operator_env = {
        _dig(e, "name"): e for e in _docs(case.container("Deployment", "-operator")["env"])
    }
    assert _dig(operator_env["MT_REDIS_PASSWORD"], "valueFrom", "secretKeyRef") == expected_ref
    claim = _claim(case)
    assert _dig(claim, "metadata", "name") == "model-trainer-artifacts"
    assert _dig(claim, "metadata", "annotations") == KEEP
    assert config["MT_OPERATOR_ARTIFACTS_CLAIM"] == "model-trainer-artifacts"
    assert not case.has("PersistentVolume") and not case.has("NetworkPolicy")


def _claim(case: Rendered) -> Doc:
    claims = case.all("PersistentVolumeClaim")
    assert len(claims) == 1
    return claims[0]


def test_claim_follows_its_values(rendered):
    claim = _claim(rendered["customized"])
    assert _dig(claim, "metadata", "annotations") is None
    assert _dig(claim, "spec") == {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "",
        "resources": {"requests": {"storage": "10Gi"}},
    }
    redis = rendered["customized"].get("StatefulSet", "-redis")
    assert _dig(redis, "spec", "volumeClaimTemplates") is None
    volumes = _docs(_dig(redis, "spec", "template", "spec", "volumes"))
    assert {"name": "data", "emptyDir": {}} in volumes


def test_given_secrets_are_used(rendered):
    custom = rendered["customized"]
    password = _dig(custom.get("Secret", "-redis"), "data", "password")
    assert base64.b64decode(str(password)).decode() == "correct horse battery"
    assert custom.operator_config()["MT_OPERATOR_REDIS_PASSWORD_SECRET"] == (
        f"{custom.release}-model-trainer-redis"
    )


def _artifact_volumes(case: Rendered) -> dict[str, Doc]:
    spec = _dig(case.get("Deployment", "-artifacts"), "spec", "template", "spec")
    return {str(v["name"]): v for v in _docs(_dig(spec, "volumes"))}


def test_operator_deployment_never_runs_twice_and_is_probed(rendered):
    for case in rendered.values():
        deployment = case.get("Deployment", "-operator")
        assert _dig(deployment, "spec", "replicas") == 1
        assert _dig(deployment, "spec", "strategy") == {"type": "Recreate"}
        container = case.container("Deployment", "-operator")
        for probe in ("livenessProbe", "readinessProbe"):
            assert _dig(container, probe, "httpGet") == {"path": "/healthz", "port": "health"}
        ports = {str(p["name"]): p["containerPort"] for p in _docs(container["ports"])}
        assert ports == {"metrics": 8080, "health": 8081}
        annotations = _doc(_dig(deployment, "spec", "template", "metadata", "annotations"))
        assert "checksum/config" in annotations


def test_config_changes_roll_the_operator(helm: str, values_dir: Path, rendered):
    path = _values_file(values_dir, "timing", {"operator": {"timing": {"cancelGraceSeconds": 5}}})
    case = rendered["default"]
    result = _run(
        [helm, "template", case.release, str(CHART), "-n", case.namespace, "-f", str(path)]
    )
    assert result.returncode == 0, result.stderr
    changed = Rendered(case.release, case.namespace, result.stdout)

    def checksum(r: Rendered) -> object:
        return _dig(r.get("Deployment", "-operator"), "spec", "template", "metadata", "annotations")

    assert checksum(changed) != checksum(case)


def test_images_come_from_values(rendered):
    default, custom = rendered["default"], rendered["customized"]
    assert default.container("Deployment", "-operator")["image"] == "model-trainer/operator:0.1.0"
    assert default.container("StatefulSet", "-redis")["image"] == "redis:7.4-alpine"
    digest = "model-trainer/operator@sha256:" + "ab" * 32
    assert custom.container("Deployment", "-operator")["image"] == digest
    assert custom.container("Deployment", "-artifacts")["image"] == digest
    spec = _dig(custom.get("Deployment", "-operator"), "spec", "template", "spec")
    assert _dig(spec, "imagePullSecrets") == [{"name": "registry"}]
    assert _dig(spec, "nodeSelector") == {"kubernetes.io/os": "linux"}


def test_external_redis_renders_no_redis(rendered):
    case = rendered["external-redis"]
    assert not case.has("StatefulSet")
    names = [_dig(o, "metadata", "name") for o in case.objects]
    assert not [n for n in names if str(n).endswith("-redis")], names
    config = case.operator_config()
    assert config["MT_OPERATOR_REDIS_URL"] == EXTERNAL_REDIS
    assert config["MT_OPERATOR_REDIS_PASSWORD_SECRET"] == "ext"
    env = {_dig(e, "name"): e for e in _docs(case.container("Deployment", "-operator")["env"])}
    assert _dig(env["MT_REDIS_PASSWORD"], "valueFrom", "secretKeyRef") == {
        "name": "ext",
        "key": "password",
    }


def test_existing_claim_renders_no_claim_and_is_used_everywhere(rendered):
    case = rendered["existing-claim"]
    assert not case.has("PersistentVolumeClaim") and not case.has("PersistentVolume")
    assert case.operator_config()["MT_OPERATOR_ARTIFACTS_CLAIM"] == "team-artifacts"
    volume = _artifact_volumes(case)["artifacts"]
    assert volume["persistentVolumeClaim"] == {"claimName": "team-artifacts", "readOnly": True}


def test_host_path_binds_the_claim_to_its_own_volume(rendered):
    case = rendered["kind-host-path"]
    (volume,) = case.all("PersistentVolume")
    claim = _claim(case)
    assert _dig(volume, "spec", "hostPath", "path") == "/var/lib/model-trainer/artifacts"
    assert _dig(volume, "spec", "storageClassName") == ""
    assert _dig(volume, "spec", "claimRef") == {
        "namespace": case.namespace,
        "name": "model-trainer-artifacts",
    }
    assert _dig(claim, "spec", "volumeName") == _dig(volume, "metadata", "name")
    assert _dig(claim, "spec", "storageClassName") == ""
    assert _dig(volume, "metadata", "annotations") == KEEP


def test_artifact_service_serves_the_claim_read_only_with_a_token(rendered):
    token_dir = "/var/run/secrets/model-trainer/artifacts"
    case = rendered["default"]
    container = case.container("Deployment", "-artifacts")
    assert container["command"] == [
        "model-trainer",
        "artifacts",
        "serve",
        "--root",
        "/artifacts",
        "--host",
        "0.0.0.0",
        "--port",
        "8082",
        "--token-file",
        f"{token_dir}/token",
    ]
    mounts = {str(m["name"]): m for m in _docs(container["volumeMounts"])}
    assert mounts["artifacts"] == {"name": "artifacts", "mountPath": "/artifacts", "readOnly": True}
    assert mounts["token"]["mountPath"] == token_dir
    volumes = _artifact_volumes(case)
    secret = case.get("Secret", "-artifacts-token")
    assert _dig(volumes["token"], "secret", "secretName") == _dig(secret, "metadata", "name")
    assert _dig(volumes["artifacts"], "persistentVolumeClaim", "claimName") == (
        "model-trainer-artifacts"
    )
    assert _dig(container, "readinessProbe", "httpGet", "path") == "/readyz"
    assert _dig(container, "livenessProbe", "httpGet", "path") == "/healthz"
    service = case.get("Service", "-artifacts")
    assert _dig(service, "spec", "ports") == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    custom = rendered["customized"]
    assert not [s for s in custom.all("Secret") if "token" in str(_dig(s, "metadata", "name"))]
    assert _dig(_artifact_volumes(custom)["token"], "secret", "secretName") == "artifact-token"


def test_auth_off_serves_without_a_token(rendered):
    case = rendered["auth-off"]
    container = case.container("Deployment", "-artifacts")
    assert "--token-file" not in _list(container["command"])
    assert "token" not in _artifact_volumes(case)
    assert not [s for s in case.all("Secret") if "token" in str(_dig(s, "metadata", "name"))]


def test_network_policies(rendered):
    case = rendered["network-policies"]
    policies = {str(_dig(p, "metadata", "name")): p for p in case.all("NetworkPolicy")}
    base = f"{case.release}-model-trainer"
    assert sorted(policies) == sorted(
        f"{base}-{s}" for s in ("operator", "redis", "artifacts", "trainer-egress")
    )
    redis_from = _docs(_dig(policies[f"{base}-redis"], "spec", "ingress"))[0]["from"]
    trainer_pods: Doc = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {LABEL_MANAGED_BY: MANAGED_BY}},
    }
    assert trainer_pods in _docs(redis_from)
    operator_selector = _dig(case.get("Deployment", "-operator"), "spec", "selector")
    assert {"podSelector": operator_selector} in _docs(redis_from)
    assert len(_docs(redis_from)) == 2
    artifacts_rule = _docs(_dig(policies[f"{base}-artifacts"], "spec", "ingress"))[0]
    assert artifacts_rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]
    assert artifacts_rule["ports"] == [{"port": 8082, "protocol": "TCP"}]
    operator_ports = _docs(_dig(policies[f"{base}-operator"], "spec", "ingress"))[0]["ports"]
    assert {int(str(p["port"])) for p in _docs(operator_ports)} == {8080, 8081}
    egress = policies[f"{base}-trainer-egress"]
    assert _dig(egress, "spec", "podSelector", "matchLabels") == {LABEL_MANAGED_BY: MANAGED_BY}
    assert {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]} in _docs(_dig(egress, "spec", "egress"))


def test_every_container_meets_the_restricted_standard(rendered):
    for name, case in rendered.items():
        for workload in case.workloads():
            pod = _doc(_dig(workload, "spec", "template", "spec"))
            where = f"{name}: {workload['kind']} {_dig(workload, 'metadata', 'name')}"
            context = _doc(pod["securityContext"])
            assert context["runAsNonRoot"] is True, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for container in _docs(pod["containers"]) + _docs(pod.get("initContainers", [])):
                security = _doc(container["securityContext"])
                assert security["allowPrivilegeEscalation"] is False, where
                assert security["capabilities"] == {"drop": ["ALL"]}, where
                assert security["readOnlyRootFilesystem"] is True, where
                assert security["runAsNonRoot"] is True, where
                assert _dig(container, "resources", "limits"), where


def test_labels(rendered):
    keys = {
        "helm.sh/chart",
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/component",
        "app.kubernetes.io/part-of",
        "app.kubernetes.io/managed-by",
    }
    for case in rendered.values():
        for obj in case.objects:
            labels = _doc(_dig(obj, "metadata", "labels"))
            assert keys <= labels.keys(), f"{obj['kind']} {_dig(obj, 'metadata', 'name')}"


# --- the kubectl bundle ----------------------------------------------------------------------


def test_bundle_is_a_fresh_render(tmp_path: Path):
    renders = []
    for name in ("first.yaml", "second.yaml"):
        result = _run(["bash", str(RENDER_SCRIPT), str(tmp_path / name)])
        assert result.returncode == 0, result.stderr
        renders.append((tmp_path / name).read_bytes())
    assert renders[0] == renders[1], "the render is not deterministic"
    assert BUNDLE.read_bytes() == renders[0], (
        "operator/deploy/install.yaml is stale: make manifests"
    )


def test_bundle_holds_the_namespace_then_the_crds_then_the_rest():
    objects = [_doc(d) for d in yaml.safe_load_all(BUNDLE.read_text()) if d]
    kinds = [o["kind"] for o in objects]
    assert kinds[:3] == ["Namespace", "CustomResourceDefinition", "CustomResourceDefinition"]
    assert "CustomResourceDefinition" not in kinds[3:]
    assert _dig(objects[0], "metadata", "name") == BUNDLE_NAMESPACE
    assert not [o for o in objects if o["kind"] == "Secret"], "a static file holds no secret"
    for obj in objects[3:]:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "PersistentVolume"):
            assert _dig(obj, "metadata", "namespace") == BUNDLE_NAMESPACE, obj["kind"]
    crds = {
        str(_dig(o, "metadata", "name")): o
        for o in objects
        if o["kind"] == "CustomResourceDefinition"
    }
    for path in CRD_DIR.glob("*.yaml"):
        crd = _doc(yaml.safe_load(path.read_text()))
        assert crds[str(_dig(crd, "metadata", "name"))] == crd


# --- against a real kube-apiserver -----------------------------------------------------------


def _kubectl(plane: ControlPlane, *args: str, stdin: str | None = None) -> str:
    assert plane.bin_dir is not None
    result = subprocess.run(
        [str(plane.bin_dir / "kubectl"), "--kubeconfig", str(plane.admin_kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    return result.stdout + result.stderr


def _restricted_namespace(plane: ControlPlane, name: str) -> None:
    labels = {f"pod-security.kubernetes.io/{mode}": RESTRICTED for mode in ("enforce", "warn")}
    with plane.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
        )
        core.create_namespaced_service_account(
            name, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default"))
        )


def _pods_of(workload: Doc) -> Doc:
    """The pod a Deployment or StatefulSet would create (there is no controller here)."""
    template = _doc(copy.deepcopy(_dig(workload, "spec", "template")))
    spec = _doc(template["spec"])
    name = str(_dig(workload, "metadata", "name"))
    claims = _dig(workload, "spec", "volumeClaimTemplates") or []
    volumes = _docs(spec.get("volumes", []))
    for claim in _docs(claims):
        claim_name = f"{_dig(claim, 'metadata', 'name')}-{name}-0"
        volumes.append(
            {
                "name": _dig(claim, "metadata", "name"),
                "persistentVolumeClaim": {"claimName": claim_name},
            }
        )
    spec["volumes"] = volumes
    metadata = _doc(template.get("metadata", {}))
    metadata["name"] = f"{name}-0"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _create_pod(plane: ControlPlane, namespace: str, pod: Doc) -> None:
    """Create the pod as a dry run: admission (Pod Security included) judges it, nothing stays."""
    with plane.api_client() as api:
        utils.create_from_dict(api, pod, namespace=namespace, dry_run="All")


@pytest.fixture(scope="module")
def applied(control_plane: ControlPlane, rendered) -> Iterator[Callable[[str], Rendered]]:
    """Apply a case's objects (for real: its pods need their ServiceAccount) once, in its own
    namespace that enforces the restricted Pod Security Standard."""
    done: dict[str, Rendered] = {}

    def apply(name: str) -> Rendered:
        if name not in done:
            case = rendered[name]
            _restricted_namespace(control_plane, case.namespace)
            output = _kubectl(
                control_plane,
                "apply",
                "--server-side",
                "--field-manager=helm-chart-test",
                "-n",
                case.namespace,
                "-f",
                "-",
                stdin=case.text,
            )
            assert "Warning" not in output, output
            done[name] = case
        return done[name]

    yield apply


@pytest.mark.k8s
@pytest.mark.parametrize("name", CASES)
def test_release_applies_and_its_pods_pass_restricted_admission(
    control_plane: ControlPlane, applied, name: str
):
    case = applied(name)
    with control_plane.api_client() as api:
        apps = client.AppsV1Api(api)
        stored = apps.list_namespaced_deployment(case.namespace).items
    assert len(stored) == len([w for w in case.workloads() if w["kind"] == "Deployment"])
    for workload in case.workloads():
        _create_pod(control_plane, case.namespace, _pods_of(workload))


@pytest.mark.k8s
def test_restricted_admission_rejects_a_privileged_pod(control_plane: ControlPlane, applied):
    """The admission check above can fail: the same pod, allowed to escalate, is refused."""
    case = applied("default")
    pod = _pods_of(case.get("Deployment", "-operator"))
    container = _docs(_dig(pod, "spec", "containers"))[0]
    _doc(container["securityContext"])["allowPrivilegeEscalation"] = True
    with pytest.raises(utils.FailToCreateError) as refused:
        _create_pod(control_plane, case.namespace, pod)
    (error,) = refused.value.api_exceptions
    assert error.status == 403
    assert "violates PodSecurity" in str(error.body)


@pytest.mark.k8s
def test_trainer_pods_of_the_chart_settings_pass_restricted_admission(
    control_plane: ControlPlane, applied
):
    """The operator's trainer pods, with the chart's settings, run in a restricted namespace."""
    case = applied("default")
    settings = OperatorSettings.from_env(case.operator_config())
    body = _doc(yaml.safe_load(EXAMPLE_JOB.read_text()))
    _doc(body["metadata"]).update(namespace=case.namespace, uid=str(uuid.uuid4()))
    resource = parse_resource(TOKENIZER_JOB, body, datetime.now(UTC))
    _create_pod(control_plane, case.namespace, pod_manifest(resource, settings, 1))


@pytest.mark.k8s
def test_bundle_applies(control_plane: ControlPlane):
    # The bundle's own Namespace is only a dry run here, and its objects need one to exist.
    with control_plane.api_client() as api:
        try:
            client.CoreV1Api(api).create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=BUNDLE_NAMESPACE))
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
    output = _kubectl(
        control_plane, "apply", "--server-side", "--dry-run=server", "-f", str(BUNDLE)
    )
    assert "Warning" not in output, output
    assert "deployment.apps/model-trainer-operator serverside-applied (server dry run)" in output


class _Named(Protocol):
    @property
    def metadata(self) -> client.V1ObjectMeta | None: ...


def _names(items: Sequence[_Named]) -> list[str]:
    return [str(item.metadata.name) for item in items if item.metadata is not None]


def _secret_value(plane: ControlPlane, namespace: str, name: str, key: str) -> str:
    with plane.api_client() as api:
        secret = client.CoreV1Api(api).read_namespaced_secret(name, namespace)
    assert secret.data is not None
    return str(secret.data[key])


@pytest.mark.k8s
def test_helm_install_upgrade_and_uninstall(control_plane: ControlPlane, helm: str, tmp_path):
    """Generated secrets survive an upgrade (lookup), and uninstall keeps the artifacts claim."""
    release = namespace = f"hi{uuid.uuid4().hex[:6]}"
    _restricted_namespace(control_plane, namespace)
    base = f"{release}-model-trainer"
    env_args = ["--kubeconfig", str(control_plane.admin_kubeconfig), "-n", namespace]
    helm_env = {
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        **{f"HELM_{d}_HOME": str(tmp_path / d.lower()) for d in ("CACHE", "CONFIG", "DATA")},
    }

    def run_helm(*args: str) -> None:
        result = subprocess.run(
            [helm, *args, *env_args], capture_output=True, text=True, check=False, env=helm_env
        )
        assert result.returncode == 0, f"helm {' '.join(args)}: {result.stderr}"

    run_helm("install", release, str(CHART))
    password = _secret_value(control_plane, namespace, f"{base}-redis", "password")
    token = _secret_value(control_plane, namespace, f"{base}-artifacts-token", "token")
    run_helm("upgrade", release, str(CHART), "--set", "operator.logLevel=debug")
    assert _secret_value(control_plane, namespace, f"{base}-redis", "password") == password
    assert _secret_value(control_plane, namespace, f"{base}-artifacts-token", "token") == token
    with control_plane.api_client() as api:
        config = client.CoreV1Api(api).read_namespaced_config_map(f"{base}-operator", namespace)
    assert config.data is not None and config.data["MT_LOG_LEVEL"] == "debug"

    run_helm("uninstall", release)
    with control_plane.api_client() as api:
        core = client.CoreV1Api(api)
        claims = _names(core.list_namespaced_persistent_volume_claim(namespace).items)
        secrets = _names(core.list_namespaced_secret(namespace).items)
        deployments = client.AppsV1Api(api).list_namespaced_deployment(namespace).items
        crds = _names(client.ApiextensionsV1Api(api).list_custom_resource_definition().items)
    assert claims == ["model-trainer-artifacts"]
    assert not [s for s in secrets if s.startswith(base)] and not deployments
    assert set(crds) >= {
        "tokenizerjobs.modeltrainer.io",
        "trainingruns.modeltrainer.io",
    }
