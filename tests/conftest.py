"""Shared fixtures: a real redis-server on a free local port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REDIS_SERVER_HINT = "redis-server is required for these tests: apt-get install redis-server"
START_TIMEOUT_SECONDS = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server process that a test can stop and start again on the same port."""

    def __init__(self, executable: str, workdir: Path, port: int | None = None) -> None:
        self.executable = executable
        self.workdir = workdir
        self.port = port if port is not None else _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0)

    def start(self) -> None:
        if self.running:
            return
        log_path = self.workdir / f"redis-{self.port}.log"
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(log_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    log_text = log_path.read_text() if log_path.exists() else ""
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited with "
                        f"{self.process.returncode}: {log_text[-2000:]}"
                    )
                try:
                    if probe.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
                time.sleep(0.02)
        finally:
            probe.close()

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and wait until it is gone."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


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
