"""The chart's Redis and artifact service, run the way a kubelet runs them: each container's
command and env from `helm template`, its Secret values from the rendered Secrets, and its mounts
and ports mapped to local folders and free ports. Their probes pass, and they do what the chart
promises: Redis with a password and an append-only file that survives a restart, the artifact
service read-only behind its token."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from controlplane import free_port

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "model-trainer"
RELEASE = "mt"
NAMESPACE = "model-trainer-system"


@pytest.fixture(scope="module")
def rendered(helm: str):
    """The default chart with a given password and token, by (kind, name)."""
    done = subprocess.run(
        [
            helm,
            "template",
            RELEASE,
            str(CHART),
            f"--namespace={NAMESPACE}",
            f"--set=redis.auth.password={secrets.token_hex(12)}",
            f"--set=artifactService.auth.token={secrets.token_hex(12)}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def _workload(rendered, kind: str, suffix: str):
    [found] = [doc for (k, name), doc in rendered.items() if k == kind and name.endswith(suffix)]
    return found["spec"]["template"]["spec"]


def _secret_value(rendered, name: str, key: str) -> str:
    secret = rendered[("Secret", name)]
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def _env(rendered, container) -> dict[str, str]:
    """The container's env as the kubelet resolves it, Secret references included."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = _secret_value(rendered, ref["name"], ref["key"])
    return env


def _mapped(args: list[str], mapping: dict[str, str]) -> list[str]:
    """args with each mapped path or port replaced, in one pass, longest first."""
    pattern = re.compile("|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)))
    return [pattern.sub(lambda match: mapping[match.group(0)], arg) for arg in args]


def _port(container, name: str) -> int:
    [port] = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def _mount_path(container, volume: str) -> str:
    [path] = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return str(path)


def _wait(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


class RedisPod:
    def __init__(self, rendered, workdir: Path) -> None:
        spec = _workload(rendered, "StatefulSet", "-redis")
        self.container = spec["containers"][0]
        port = _port(self.container, "redis")
        self.port = free_port()
        self.data = workdir / "data"
        self.data.mkdir(exist_ok=True)
        self.mapping = {
            str(port): str(self.port),
            _mount_path(self.container, "data"): str(self.data),
        }
        self.env = {**os.environ, **_env(rendered, self.container)}
        self.log = workdir / "redis.log"

    @contextmanager
    def running(self) -> Iterator[subprocess.Popen[bytes]]:
        with self.log.open("ab") as log:
            process = subprocess.Popen(
                _mapped(self.container["command"], self.mapping),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait("Redis's readiness probe", self.ready)
            yield process
        finally:
            if process.poll() is None:
                assert _stop(process) == 0, self.log.read_text()[-2000:]

    def ready(self) -> bool:
        probe = _mapped(self.container["readinessProbe"]["exec"]["command"], self.mapping)
        return subprocess.run(probe, env=self.env, capture_output=True).returncode == 0

    def cli(self, *args: str, password: bool = True) -> str:
        env = dict(self.env)
        if not password:
            env.pop("REDISCLI_AUTH", None)
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip()


def test_redis_requires_its_password_and_keeps_its_data(rendered, tmp_path: Path):
    redis = RedisPod(rendered, tmp_path)
    with redis.running():
        assert "NOAUTH" in redis.cli("ping", password=False)
        assert redis.cli("ping") == "PONG"
        assert redis.cli("config", "get", "appendonly").splitlines() == ["appendonly", "yes"]
        assert redis.cli("set", "mt:key", "kept") == "OK"
    # The password came from the Secret, not from the pod spec.
    assert redis.env["REDIS_PASSWORD"] not in json.dumps(redis.container["command"])
    with redis.running():
        assert redis.cli("get", "mt:key") == "kept"


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except urllib.error.URLError:
        return 0, b""  # not listening yet


def test_artifact_service_serves_the_claim_behind_its_token(rendered, tmp_path: Path):
    spec = _workload(rendered, "Deployment", "-artifacts")
    container = spec["containers"][0]
    token_dir = _mount_path(container, "token")
    [token_volume] = [v for v in spec["volumes"] if v["name"] == "token"]
    secret_name = token_volume["secret"]["secretName"]
    token = _secret_value(rendered, secret_name, "token")
    local_tokens = tmp_path / "token"
    local_tokens.mkdir()
    (local_tokens / "token").write_text(token)
    artifacts = tmp_path / "artifacts"
    job = artifacts / "team" / "trainingruns" / "gpt"
    job.mkdir(parents=True)
    (job / "model.safetensors").write_bytes(b"weights")
    port = free_port()
    mapping = {
        token_dir: str(local_tokens),
        _mount_path(container, "artifacts"): str(artifacts),
        str(_port(container, "http")): str(port),
    }
    command = _mapped(container["command"], mapping)
    assert command[0] == "model-trainer"
    command[0] = str(Path(sys.executable).parent / "model-trainer")
    process = subprocess.Popen(
        command,
        env={**os.environ, **_env(rendered, container), "HOME": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "artifacts.log").open("wb"),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for probe in ("livenessProbe", "readinessProbe"):
            path = container[probe]["httpGet"]["path"]
            _wait(f"the {probe}", lambda path=path: _get(base + path)[0] == 200)
        files = f"{base}/v1/namespaces/team/trainingruns/gpt/files"
        assert _get(files)[0] == 401
        status, body = _get(files, token)
        assert status == 200
        assert [f["path"] for f in json.loads(body)["files"]] == ["model.safetensors"]
        assert _get(f"{files}/model.safetensors", token) == (200, b"weights")
    finally:
        assert _stop(process) == 0, (tmp_path / "artifacts.log").read_text()[-3000:]
