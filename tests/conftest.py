"""Shared fixtures: a real redis-server on a free local port; a real Kubernetes control plane."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from kubernetes.client import ApiException

from controlplane import ControlPlane, ControlPlaneError, helm_binary
from operator_support import OPERATOR_NAMESPACE, OPERATOR_SA, Cluster, OperatorProcess, install_rbac
from redis_server import RedisServer

REDIS_SERVER_HINT = "redis-server is required for these tests: apt-get install redis-server"


def _redis_server_executable() -> str:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail(REDIS_SERVER_HINT, pytrace=False)
    return executable


def _started_server(workdir: Path) -> RedisServer:
    executable = _redis_server_executable()
    last_error: RuntimeError | None = None
    for _ in range(3):  # a free port can be taken by someone else before the server binds it
        server = RedisServer(executable, workdir)
        try:
            server.start()
        except RuntimeError as exc:
            last_error = exc
            continue
        return server
    pytest.fail(f"could not start redis-server: {last_error}", pytrace=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session. Do not stop it; use `private_redis_server`."""
    server = _started_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, which it may stop and start again."""
    server = _started_server(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's redis-server. Tests share it, so key everything by a new UID."""
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def helm() -> str:
    """The path of the pinned Helm CLI, built once from tools/helm."""
    try:
        return str(helm_binary())
    except ControlPlaneError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A real etcd and kube-apiserver with the project's CRDs, shared by the session.

    Tests that use it are marked `k8s`. Use `k8s_namespace` for a namespace of your own.
    """
    plane = ControlPlane(tmp_path_factory.mktemp("k8s"))
    error: Exception | None = None
    try:
        plane.start()
        plane.apply_crds()
    except (ControlPlaneError, ApiException) as exc:
        plane.stop()
        error = exc
    if error is not None:
        pytest.fail(f"could not start the test control plane: {error}", pytrace=False)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def k8s_namespace(control_plane: ControlPlane) -> str:
    """A new namespace with a `default` ServiceAccount; never deleted, as nothing finalizes it."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    control_plane.create_namespace(name)
    return name


# Short timeouts, so that heartbeat, grace and TTL behaviour shows within seconds.
FAST_SETTINGS: dict[str, object] = {
    "heartbeat_timeout_seconds": "4",
    "heartbeat_failure_seconds": "4",
    "cancel_grace_seconds": "5",
    "tokenizer_grace_seconds": "30",
    "reconcile_interval_seconds": "0.5",
    "status_min_interval_seconds": "1",
}


@pytest.fixture(scope="session")
def operator_kubeconfig(control_plane: ControlPlane, tmp_path_factory) -> Path:
    """A kubeconfig with a token of the operator's ServiceAccount, bound by the RBAC manifest."""
    install_rbac(control_plane)
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    return control_plane.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SA, path)


OperatorFactory = Callable[..., OperatorProcess]


@pytest.fixture
def start_operator(
    operator_kubeconfig: Path, k8s_namespace: str, redis_server, tmp_path: Path
) -> Iterator[OperatorFactory]:
    started: list[OperatorProcess] = []

    def start(**overrides: object) -> OperatorProcess:
        settings = {**FAST_SETTINGS, **overrides}
        process = OperatorProcess(
            operator_kubeconfig,
            k8s_namespace,
            redis_server.url,
            tmp_path / "operator.log",
            **settings,
        )
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def cluster(control_plane: ControlPlane, k8s_namespace: str) -> Iterator[Cluster]:
    with control_plane.api_client() as api:
        yield Cluster(api, k8s_namespace)
