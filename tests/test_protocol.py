"""The Redis key protocol against a real redis-server."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from model_trainer import protocol
from model_trainer.api.common import ArtifactsStatus, EvalMetrics, Phase, Progress


def new_uid() -> str:
    return str(uuid.uuid4())


def sample_state() -> protocol.RunState:
    return protocol.RunState(
        phase=Phase.RUNNING,
        reason="Started",
        message="training started",
        started_at=1_700_000_000.5,
        artifacts=ArtifactsStatus(path="default/TrainingRun/demo", manifest_sha256="a" * 64),
        attempt=2,
        updated_at=1_700_000_001.0,
    )


def sample_progress() -> Progress:
    return Progress(step=7, total_steps=20, percent=35, loss=3.25, tokens_per_second=1234.5)


def sample_eval() -> EvalMetrics:
    return EvalMetrics(loss=2.5, perplexity=12.18, bits_per_byte=1.9, tokens=640, step=7)


def write_everything(client: redis.Redis, uid: str) -> None:
    protocol.write_heartbeat(client, uid, now=1_700_000_123.25)
    protocol.write_state(client, uid, sample_state())
    protocol.write_progress(client, uid, sample_progress())
    protocol.write_eval(client, uid, sample_eval())
    protocol.request_cancel(client, uid)


def test_keys_are_per_uid_and_never_collide() -> None:
    first, second = protocol.keys_for("uid-a"), protocol.keys_for("uid-b")
    assert len(set(first)) == len(first)
    assert not set(first) & set(second)
    for key in first:
        assert key.startswith(f"{protocol.KEY_PREFIX}:uid-a:")


@pytest.mark.parametrize("bad", ["", "a:b", ":", "uid:"])
def test_invalid_uid_is_rejected(bad: str, redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="invalid run uid"):
        protocol.keys_for(bad)
    with pytest.raises(ValueError, match="invalid run uid"):
        protocol.write_heartbeat(redis_client, bad)


def test_every_key_gets_a_ttl(redis_client: redis.Redis) -> None:
    uid = new_uid()
    write_everything(redis_client, uid)
    keys = protocol.keys_for(uid)
    heartbeat_ttl = redis_client.ttl(keys.heartbeat)
    assert isinstance(heartbeat_ttl, int)
    assert 0 < heartbeat_ttl <= protocol.HEARTBEAT_TTL_SECONDS
    for key in (keys.state, keys.progress, keys.eval, keys.cancel):
        ttl = redis_client.ttl(key)
        assert isinstance(ttl, int)
        assert protocol.HEARTBEAT_TTL_SECONDS < ttl <= protocol.STATE_TTL_SECONDS, key


def test_writes_refresh_the_ttl(redis_client: redis.Redis) -> None:
    uid = new_uid()
    key = protocol.keys_for(uid).progress
    protocol.write_progress(redis_client, uid, sample_progress())
    redis_client.expire(key, 10)
    protocol.write_progress(redis_client, uid, sample_progress())
    ttl = redis_client.ttl(key)
    assert isinstance(ttl, int)
    assert ttl > 10


def test_round_trip_through_read_run(redis_client: redis.Redis) -> None:
    uid = new_uid()
    assert protocol.read_run(redis_client, uid) == protocol.RunSnapshot(
        heartbeat=None, state=None, progress=None, eval=None, cancel_requested=False
    )
    state = sample_state()
    protocol.write_heartbeat(redis_client, uid, now=1_700_000_123.25)
    protocol.write_state(redis_client, uid, state)
    protocol.write_progress(redis_client, uid, sample_progress())
    protocol.write_eval(redis_client, uid, sample_eval())

    snapshot = protocol.read_run(redis_client, uid)
    assert snapshot.heartbeat == 1_700_000_123.25
    assert snapshot.state == state
    assert snapshot.progress == sample_progress()
    assert snapshot.eval == sample_eval()
    assert snapshot.cancel_requested is False


def test_values_are_camel_case_json(redis_client: redis.Redis) -> None:
    uid = new_uid()
    write_everything(redis_client, uid)
    keys = protocol.keys_for(uid)
    progress_raw = redis_client.get(keys.progress)
    state_raw = redis_client.get(keys.state)
    assert isinstance(progress_raw, bytes)
    assert isinstance(state_raw, bytes)
    assert json.loads(progress_raw)["totalSteps"] == 20
    state = json.loads(state_raw)
    assert state["phase"] == "Running"
    assert state["artifacts"]["manifestSha256"] == "a" * 64


def test_unreadable_values_read_as_missing(redis_client: redis.Redis) -> None:
    uid = new_uid()
    keys = protocol.keys_for(uid)
    redis_client.set(keys.state, "not json")
    redis_client.set(keys.progress, json.dumps({"step": -1}))
    redis_client.set(keys.heartbeat, "yesterday")
    snapshot = protocol.read_run(redis_client, uid)
    assert snapshot.state is None
    assert snapshot.progress is None
    assert snapshot.heartbeat is None


def _next_message(pubsub: redis.client.PubSub, timeout: float = 2.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if isinstance(message, dict) and message.get("type") == "message":
            return message
    raise AssertionError("no message on the events channel")


def test_events_are_published_as_json(redis_client: redis.Redis) -> None:
    uid = new_uid()
    channel = protocol.keys_for(uid).events
    pubsub = redis_client.pubsub()
    try:
        pubsub.subscribe(channel)
        confirmation = pubsub.get_message(timeout=2.0)
        assert isinstance(confirmation, dict)
        assert confirmation["type"] == "subscribe"

        protocol.write_state(redis_client, uid, sample_state())
        protocol.write_progress(redis_client, uid, sample_progress())
        protocol.write_eval(redis_client, uid, sample_eval())

        events = []
        for _ in range(3):
            message = _next_message(pubsub)
            assert message["channel"] == channel.encode()
            data = message["data"]
            assert isinstance(data, bytes)
            assert isinstance(json.loads(data), dict)
            events.append(protocol.RunEvent.model_validate_json(data))
    finally:
        pubsub.close()

    assert [e.type for e in events] == ["state", "progress", "eval"]
    assert {e.uid for e in events} == {uid}
    assert events[0].state == sample_state()
    assert events[1].progress == sample_progress()
    assert events[2].eval == sample_eval()


def test_cancel_request(redis_client: redis.Redis) -> None:
    uid, other = new_uid(), new_uid()
    assert protocol.cancel_requested(redis_client, uid) is False
    protocol.request_cancel(redis_client, uid)
    assert protocol.cancel_requested(redis_client, uid) is True
    assert protocol.read_run(redis_client, uid).cancel_requested is True
    assert protocol.cancel_requested(redis_client, other) is False


def test_delete_run_removes_every_key(redis_client: redis.Redis) -> None:
    uid, bystander = new_uid(), new_uid()
    write_everything(redis_client, uid)
    write_everything(redis_client, bystander)

    assert protocol.delete_run(redis_client, uid) == 5
    assert redis_client.keys(f"{protocol.KEY_PREFIX}:{uid}:*") == []
    assert protocol.read_run(redis_client, uid) == protocol.RunSnapshot(
        heartbeat=None, state=None, progress=None, eval=None, cancel_requested=False
    )
    assert protocol.read_run(redis_client, bystander).state == sample_state()
    assert protocol.delete_run(redis_client, uid) == 0


def test_recreated_resource_sees_nothing_of_the_old_run(redis_client: redis.Redis) -> None:
    # Same namespace/name, new object: Kubernetes gives it a new UID.
    old_uid, new_uid_ = new_uid(), new_uid()
    write_everything(redis_client, old_uid)

    snapshot = protocol.read_run(redis_client, new_uid_)
    assert snapshot == protocol.RunSnapshot(
        heartbeat=None, state=None, progress=None, eval=None, cancel_requested=False
    )
    assert redis_client.keys(f"{protocol.KEY_PREFIX}:{new_uid_}:*") == []
    assert protocol.read_run(redis_client, old_uid).cancel_requested is True


def test_connect_fails_fast_when_nothing_listens() -> None:
    client = protocol.connect("redis://127.0.0.1:1/0", timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert time.monotonic() - started < 1.0
    client.close()


def test_connect_takes_the_password_from_the_environment(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from controlplane import free_port

    port = free_port()
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            "s3cret",
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            try:
                protocol.connect(url).ping()
            except redis.AuthenticationError:
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise AssertionError("redis-server with a password did not come up")
        monkeypatch.setenv("MT_REDIS_PASSWORD", "s3cret")
        assert protocol.connect(url).ping()
    finally:
        server.terminate()
        server.wait(10)
