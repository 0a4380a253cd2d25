"""The container images, built by scripts/images.sh and run the way a pod runs them: a non-root
user, a read-only root filesystem and, where the job allows, no network.

Opt-in: they need a Docker engine and a few minutes the first time, so they run with
MT_TEST_IMAGES=1 (as CI does after `make images`); then a missing engine or a failed build fails
them, and nothing is skipped quietly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from controlplane import free_port
from lm_support import SHAKESPEARE, run_doc, tokenizer_doc
from operator_support import Cluster, pod_env, wait_for

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
TRAINER = f"model-trainer/trainer:{VERSION}"
OPERATOR = f"model-trainer/operator:{VERSION}"
USER = "10001:10001"
OCI_LABELS = ["title", "description", "version", "source", "licenses", "revision", "created"]

pytestmark = [
    pytest.mark.images,
    pytest.mark.skipif(
        os.environ.get("MT_TEST_IMAGES") != "1",
        reason="container images: set MT_TEST_IMAGES=1 to build and test them (needs Docker)",
    ),
    # The first build downloads the wheels and builds both images.
    pytest.mark.timeout(1800),
]


def docker_client() -> str:
    """The client scripts/images.sh uses: $DOCKER, else Debian's, else the one on PATH."""
    chosen = os.environ.get("DOCKER") or (
        "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
    )
    if not chosen:
        pytest.fail("no docker client; scripts/images.sh installs one", pytrace=False)
    return chosen


@pytest.fixture(scope="session")
def docker() -> str:
    """Both images, brought up to date by scripts/images.sh (seconds when nothing changed)."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "images.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1700,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/images.sh failed:\n{done.stderr[-4000:]}", pytrace=False)
    return docker_client()


def run(docker: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [docker, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def in_image(docker: str, image: str, *command: str, entrypoint: str = "") -> str:
    """Run a command in a locked-down container of the image; its stdout."""
    args = ["run", "--rm", "--read-only", "--network", "none", "--tmpfs", "/tmp"]
    if entrypoint:
        args += ["--entrypoint", entrypoint]
    done = run(docker, *args, image, *command)
    assert done.returncode == 0, f"{command} in {image}: {done.stderr[-2000:]}"
    return done.stdout


def image_config(docker: str, image: str):
    done = run(docker, "image", "inspect", image)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[0]


def git_revision() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.parametrize(
    ("image", "entrypoint"), [(TRAINER, "model-trainer"), (OPERATOR, "model-trainer-operator")]
)
def test_image_config(docker, image, entrypoint):
    config = image_config(docker, image)["Config"]
    assert config["User"] == USER
    assert config["Entrypoint"] == [entrypoint]
    labels = config["Labels"]
    assert {f"org.opencontainers.image.{name}" for name in OCI_LABELS} <= set(labels)
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.revision"] == git_revision()
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.created"].endswith("Z")


@pytest.mark.parametrize("image", [TRAINER, OPERATOR])
def test_runs_as_non_root_without_compilers_or_bytecode(docker, image):
    assert in_image(docker, image, "-c", "id -u; id -g", entrypoint="sh").split() == [
        "10001",
        "10001",
    ]
    compilers = "for c in gcc cc c++ g++ clang make; do command -v $c; done; true"
    assert in_image(docker, image, "-c", compilers, entrypoint="sh") == ""
    # Bytecode would be written at build time only, so it could only be stale or unreproducible.
    pycache = "find / -xdev -name __pycache__ -o -name '*.pyc' | head -5"
    assert in_image(docker, image, "-c", pycache, entrypoint="sh") == ""


def test_trainer_image_is_a_batch_job_without_healthcheck(docker):
    assert image_config(docker, TRAINER)["Config"]["Healthcheck"]["Test"] == ["NONE"]


def test_operator_image_has_no_torch_transformers_or_tokenizers(docker):
    probe = (
        "import importlib.util, json, kopf, model_trainer_operator, model_trainer.cli; "
        "print(json.dumps([m for m in ('torch', 'transformers', 'tokenizers', 'numpy') "
        "if importlib.util.find_spec(m)]))"
    )
    assert json.loads(in_image(docker, OPERATOR, "-c", probe, entrypoint="python")) == []
    assert "--namespace" in in_image(docker, OPERATOR, "--help")
    assert "serve" in in_image(docker, OPERATOR, "artifacts", "--help", entrypoint="model-trainer")
    # Without torch, a CPU-only operator image stays small; torch alone would add gigabytes.
    assert image_config(docker, OPERATOR)["Size"] < 400 * 1024 * 1024


def artifacts_dir(tmp_path: Path) -> Path:
    """A folder the container's user 10001 can write, with a small corpus."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    artifacts.chmod(0o777)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    (artifacts / "corpus.txt").write_text(text, encoding="utf-8")
    return artifacts


def test_trainer_image_trains_locally_read_only_and_offline(docker, tmp_path):
    artifacts = artifacts_dir(tmp_path)
    specs = [
        tokenizer_doc(),
        run_doc(),
    ]
    (artifacts / "specs.yaml").write_text(yaml.safe_dump_all(specs))
    started = time.monotonic()
    done = run(
        docker,
        "run", "--rm", "--read-only", "--network", "none", "--user", USER, "--tmpfs", "/tmp",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "-v", f"{artifacts}:/artifacts",
        TRAINER, "run", "-f", "/artifacts/specs.yaml", "--artifacts", "/artifacts",
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    seconds = time.monotonic() - started
    run_dir = artifacts / "default" / "trainingruns" / "gpt"
    for job in (artifacts / "default" / "tokenizerjobs" / "tok", run_dir):
        assert json.loads((job / "manifest.json").read_text())["status"] == "succeeded"
    model = run_dir / "model.safetensors"
    assert model.stat().st_size > 0
    assert model.stat().st_uid == 10001
    assert seconds < 300


def test_operator_image_serves_artifacts(docker, tmp_path):
    artifacts = artifacts_dir(tmp_path)
    port = free_port()
    name = f"mt-artifacts-{uuid.uuid4().hex[:8]}"
    with Container(
        docker,
        name,
        "--network", "host", "-v", f"{artifacts}:/artifacts:ro",
        "-e", f"MT_HEALTHCHECK_URL=http://127.0.0.1:{port}/healthz",
        "--entrypoint", "model-trainer", OPERATOR,
        "artifacts", "serve", "--root", "/artifacts", "--host", "127.0.0.1", "--port", str(port),
    ):  # fmt: skip
        wait_for("the artifact service", lambda: healthy(docker, name, port), timeout=60)
        assert_healthcheck_passes(docker, name)


@pytest.mark.k8s
def test_operator_image_runs_a_tokenizer_job_through_the_trainer_image(
    docker, control_plane, operator_kubeconfig, k8s_namespace, redis_server, tmp_path
):
    """The operator's image against a real kube-apiserver, and the trainer's image playing the
    pod that it creates: the TokenizerJob succeeds through Redis and the status."""
    health_port, metrics_port = free_port(), free_port()
    ca_file = yaml.safe_load(operator_kubeconfig.read_text())["clusters"][0]["cluster"][
        "certificate-authority"
    ]
    name = f"mt-operator-{uuid.uuid4().hex[:8]}"
    with Container(
        docker,
        name,
        "--network", "host",
        "-v", f"{operator_kubeconfig}:/etc/model-trainer/kubeconfig:ro",
        "-v", f"{ca_file}:{ca_file}:ro",
        "-e", "KUBECONFIG=/etc/model-trainer/kubeconfig",
        "-e", f"MT_OPERATOR_REDIS_URL={redis_server.url}",
        "-e", f"MT_OPERATOR_HEALTH_PORT={health_port}",
        "-e", f"MT_OPERATOR_METRICS_PORT={metrics_port}",
        "-e", f"MT_OPERATOR_TRAINER_IMAGE={TRAINER}",
        "-e", "MT_OPERATOR_RECONCILE_INTERVAL_SECONDS=0.5",
        OPERATOR, "--namespace", k8s_namespace,
    ):  # fmt: skip
        wait_for("the operator's /healthz", lambda: healthy(docker, name, health_port), 60)
        assert_healthcheck_passes(docker, name)

        artifacts = artifacts_dir(tmp_path)
        with control_plane.api_client() as api:
            cluster = Cluster(api, k8s_namespace)
            spec = tokenizer_doc()["spec"]
            assert isinstance(spec, dict)
            job = cluster.create("TokenizerJob", "tok", spec)
            pod = cluster.wait_pod(job["metadata"]["uid"])
            trainer = pod.spec.containers[0]
            assert trainer.image == TRAINER
            cluster.set_pod_phase(pod.metadata.name, "Running")
            done = play_pod(docker, pod, artifacts)
            assert done.returncode == 0, done.stderr[-4000:]
            cluster.set_pod_phase(pod.metadata.name, "Succeeded", exit_code=0)
            status = cluster.wait_phase("TokenizerJob", "tok", "Succeeded")
    assert status["stats"]["vocabSize"] == 320
    job_dir = artifacts / k8s_namespace / "tokenizerjobs" / "tok"
    assert json.loads((job_dir / "manifest.json").read_text())["status"] == "succeeded"


def play_pod(docker: str, pod, artifacts: Path) -> subprocess.CompletedProcess[str]:
    """Run the pod's container as a kubelet would: its command, env, user and security context,
    with the artifacts volume at /artifacts, an emptyDir at /tmp and one CPU."""
    trainer = pod.spec.containers[0]
    security = pod.spec.security_context
    env = [arg for key, value in pod_env(pod).items() for arg in ("-e", f"{key}={value}")]
    return run(
        docker,
        "run", "--rm", "--read-only", "--network", "host", "--cpus", "1",
        "--user", f"{security.run_as_user}:{security.run_as_group}",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--tmpfs", "/tmp", "-v", f"{artifacts}:/artifacts",
        *env, "--entrypoint", trainer.command[0], trainer.image, *trainer.command[1:],
        timeout=600,
    )  # fmt: skip


class Container:
    """A detached, locked-down container, removed on exit (its log shown if a check failed)."""

    def __init__(self, docker: str, name: str, *args: str) -> None:
        self.docker, self.name, self.args = docker, name, args

    def __enter__(self) -> str:
        done = run(
            self.docker,
            "run", "-d", "--name", self.name, "--read-only", "--user", USER,
            "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            *self.args,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return self.name

    def __exit__(self, exc_type, exc, tb) -> None:
        logs = run(self.docker, "logs", "--tail", "60", self.name)
        run(self.docker, "rm", "-f", self.name)
        if exc is not None:
            raise AssertionError(
                f"{exc}\n--- {self.name} log:\n{logs.stdout}{logs.stderr}"
            ) from exc


def healthy(docker: str, name: str, port: int) -> bool:
    state = run(docker, "inspect", "--format", "{{.State.Running}}", name).stdout.strip()
    if state != "true":
        raise AssertionError(f"container {name} is not running")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def assert_healthcheck_passes(docker: str, name: str) -> None:
    """The image's own HEALTHCHECK command, run in the container now instead of every 30 s."""
    test = image_config(docker, OPERATOR)["Config"]["Healthcheck"]["Test"]
    assert test[0] == "CMD"
    done = run(docker, "exec", name, *test[1:])
    assert done.returncode == 0, done.stderr
