"""The examples users copy: accepted by a real API server, and they train as written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controlplane import ControlPlane, k8s_bin_dir

ROOT = Path(__file__).resolve().parent.parent
TRAINER_CLI = Path(sys.executable).parent / "model-trainer"
CLUSTER_EXAMPLES = ROOT / "examples" / "cluster"
EXAMPLE_FILES = ["corpus-configmap.yaml", "tokenizerjob.yaml", "trainingrun.yaml"]
ARGOCD = ROOT / "examples" / "argocd"
REPO_URL = "https://github.com/model-trainer/model-trainer.git"


def _documents(path: Path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kustomization_lists_every_example():
    kustomization = _documents(CLUSTER_EXAMPLES / "kustomization.yaml")[0]
    assert kustomization["resources"] == EXAMPLE_FILES
    assert sorted(p.name for p in CLUSTER_EXAMPLES.glob("*.yaml")) == sorted(
        [*EXAMPLE_FILES, "kustomization.yaml"]
    )


@pytest.mark.k8s
def test_cluster_examples_are_accepted_by_the_api_server(
    control_plane: ControlPlane, k8s_namespace: str
):
    kubectl = k8s_bin_dir() / "kubectl"
    result = subprocess.run(
        [
            str(kubectl),
            f"--kubeconfig={control_plane.admin_kubeconfig}",
            f"--namespace={k8s_namespace}",
            "apply",
            "--server-side",
            "-k",
            str(CLUSTER_EXAMPLES),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    created = sorted(line.split()[0] for line in result.stdout.splitlines())
    assert created == [
        "configmap/village-corpus",
        "tokenizerjob.modeltrainer.io/village-bpe",
        "trainingrun.modeltrainer.io/village-gpt2",
    ]


def test_cluster_examples_train_in_local_mode(tmp_path: Path):
    """The same YAML, run by the trainer on this machine: both jobs succeed."""
    files = [arg for name in EXAMPLE_FILES for arg in ("-f", str(CLUSTER_EXAMPLES / name))]
    result = subprocess.run(
        [str(TRAINER_CLI), "run", *files, "--artifacts", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for kind, name in [("tokenizerjobs", "village-bpe"), ("trainingruns", "village-gpt2")]:
        manifest = json.loads((tmp_path / "default" / kind / name / "manifest.json").read_text())
        assert manifest["status"] == "succeeded", manifest
    run_dir = tmp_path / "default" / "trainingruns" / "village-gpt2"
    assert (run_dir / "model.safetensors").stat().st_size > 0
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["final"]["step"] == 200


def test_kind_values_use_the_folder_kind_mounts():
    """The chart's hostPath on kind is where kind-config.yaml mounts ./artifacts in the node."""
    kind_config = _documents(ROOT / "kind-config.yaml")[0]
    nodes = kind_config["nodes"]
    assert isinstance(nodes, list) and len(nodes) == 1
    mounts = {m["hostPath"]: m["containerPath"] for m in nodes[0]["extraMounts"]}
    values = _documents(ROOT / "examples" / "kind-values.yaml")[0]
    artifacts = values["artifacts"]
    assert isinstance(artifacts, dict)
    assert mounts == {"./artifacts": artifacts["hostPath"]}


def _application(name: str):
    app = _documents(ARGOCD / name)[0]
    assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
    return app


def _wave(app) -> int:
    metadata = app["metadata"]
    assert isinstance(metadata, dict)
    return int(metadata.get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))


def test_argocd_syncs_the_operator_before_the_jobs():
    chart_app = _application("model-trainer.yaml")
    jobs_app = _application("training-jobs.yaml")
    assert _wave(chart_app) < _wave(jobs_app)
    for app, path in [(chart_app, "helm/model-trainer"), (jobs_app, "examples/cluster")]:
        source = app["spec"]["source"]
        assert source["repoURL"] == REPO_URL and source["path"] == path
        assert (ROOT / path).is_dir()
        assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    # Both go to the chart's namespace, which holds the claim and the Redis Secret the pods need.
    assert chart_app["spec"]["destination"] == jobs_app["spec"]["destination"]
    # Within the jobs' app, the corpus comes before the jobs, and the jobs wait for their CRDs.
    for name in EXAMPLE_FILES:
        doc = _documents(CLUSTER_EXAMPLES / name)[0]
        expected = 0 if doc["kind"] == "ConfigMap" else 1
        assert _wave(doc) == expected, name
        if expected:
            options = doc["metadata"]["annotations"]["argocd.argoproj.io/sync-options"]
            assert "SkipDryRunOnMissingResource=true" in options
    root = _application("app-of-apps.yaml")
    assert root["spec"]["source"]["path"] == "examples/argocd"


def test_argocd_values_render_with_secrets_created_once(helm: str, tmp_path: Path):
    """Argo CD renders with `helm template`, which cannot look up Secrets: the Application's
    values must name existing Secrets, so that no render makes a new random password."""
    source = _application("model-trainer.yaml")["spec"]["source"]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(source["helm"]["valuesObject"]))
    renders = [
        subprocess.run(
            [
                helm,
                "template",
                source["helm"]["releaseName"],
                str(ROOT / source["path"]),
                "--namespace=model-trainer-system",
                f"--values={values}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        for _ in range(2)
    ]
    assert renders[0].returncode == 0, renders[0].stderr
    assert renders[0].stdout == renders[1].stdout
    kinds = [doc["kind"] for doc in yaml.safe_load_all(renders[0].stdout) if doc]
    assert "Secret" not in kinds and "Deployment" in kinds
