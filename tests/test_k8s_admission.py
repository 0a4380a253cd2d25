"""The CRDs' validation, enforced by a real kube-apiserver: what it rejects, what it keeps."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client import ApiException
from pydantic import BaseModel

from controlplane import ControlPlane, client_from_kubeconfig
from model_trainer.api import (
    GROUP,
    VERSION,
    ArtifactsStatus,
    Condition,
    EvalMetrics,
    EvaluationResult,
    Phase,
    Progress,
    TokenizerJob,
    TokenizerJobStatus,
    TrainingRun,
    TrainingRunStatus,
)
from model_trainer.api.tokenizer_job import TokenizerStats

pytestmark = pytest.mark.k8s

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "demo"
PLURALS = {"TokenizerJob": "tokenizerjobs", "TrainingRun": "trainingruns"}
TOKENIZER_IMMUTABLE = "the tokenizer settings and the corpus are immutable"
RUN_IMMUTABLE = "tokenizerRef, corpus, holdoutFraction, model and training are immutable"
ONE_SOURCE = "exactly one of path, configMapRef or url must be set"
SHA256 = "0" * 64

Obj = dict[str, object]


def _example(kind: str) -> Obj:
    document: Obj = yaml.safe_load((EXAMPLES / f"{kind.lower()}.yaml").read_text())
    assert document["kind"] == kind
    return document


def _merged(base: Obj, patch: Obj) -> Obj:
    """base with patch merged in, like a JSON merge patch: None deletes a key."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        current = out.get(key)
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(current, dict):
            out[key] = _merged(current, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _manifest(kind: str, name: str, spec_patch: Obj | None = None) -> Obj:
    document = _merged(_example(kind), {"metadata": {"name": name}})
    return _merged(document, {"spec": spec_patch}) if spec_patch else document


def _kept(sent: object, stored: object) -> bool:
    """Whether stored has everything sent (and maybe more, from the schema's defaults)."""
    if isinstance(sent, dict) and isinstance(stored, dict):
        return all(key in stored and _kept(value, stored[key]) for key, value in sent.items())
    return sent == stored


def _obj(value: object) -> Obj:
    assert isinstance(value, dict)
    return value


def _spec(obj: Obj) -> Obj:
    return _obj(obj["spec"])


class Objects:
    """The custom resources of one namespace, through the admin client."""

    def __init__(self, api: client.CustomObjectsApi, namespace: str) -> None:
        self.api = api
        self.namespace = namespace

    def create(self, body: Obj) -> Obj:
        return _obj(
            self.api.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURALS[str(body["kind"])], body
            )
        )

    def get(self, kind: str, name: str) -> Obj:
        return _obj(
            self.api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURALS[kind], name
            )
        )

    def patch_spec(self, kind: str, name: str, spec_patch: Obj) -> Obj:
        return _obj(
            self.api.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURALS[kind], name, {"spec": spec_patch}
            )
        )

    def replace_status(self, body: Obj) -> Obj:
        name = body["metadata"]
        assert isinstance(name, dict)
        return _obj(
            self.api.replace_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURALS[str(body["kind"])], name["name"], body
            )
        )


@pytest.fixture
def objects(control_plane: ControlPlane, k8s_namespace: str) -> Iterator[Objects]:
    with control_plane.api_client() as api:
        yield Objects(client.CustomObjectsApi(api), k8s_namespace)


def _rejection(call: Callable[[], object]) -> str:
    """The API server's message for a request that must be rejected as invalid."""
    with pytest.raises(ApiException) as info:
        call()
    body = json.loads(info.value.body or "{}")
    assert (info.value.status, body["reason"]) == (422, "Invalid"), body
    message: str = body["message"]
    return message


# (kind, spec patch, substrings of the API server's message)
INVALID_ON_CREATE = [
    pytest.param(
        "TokenizerJob",
        {"algorithm": "sentencepiece"},
        ["spec.algorithm", 'Unsupported value: "sentencepiece"', '"bpe", "unigram", "wordpiece"'],
        id="unknown-algorithm",
    ),
    pytest.param(
        "TokenizerJob",
        {"vocabSize": 257},  # the example has 2 special tokens: bpe needs 258
        [
            "spec: Invalid value",
            "vocabSize of a byte-level bpe tokenizer must cover the 256 byte alphabet plus the "
            "special tokens",
        ],
        id="bpe-vocab-below-alphabet",
    ),
    pytest.param(
        "TokenizerJob",
        {"vocabSize": 300, "specialTokens": [f"<|s{i}|>" for i in range(50)]},
        ["vocabSize of a byte-level bpe tokenizer must cover the 256 byte alphabet"],
        id="bpe-vocab-below-alphabet-plus-special-tokens",
    ),
    pytest.param(
        "TrainingRun",
        {"model": {"nEmbd": 100, "nHead": 3}},
        ["spec.model: Invalid value", "nEmbd must be divisible by nHead"],
        id="embd-not-divisible-by-heads",
    ),
    pytest.param(
        "TokenizerJob",
        {"corpus": {"configMapRef": {"name": "text"}}},
        ["spec.corpus: Invalid value", ONE_SOURCE],
        id="path-and-configmap",
    ),
    pytest.param(
        "TrainingRun",
        {"corpus": {"url": "https://example.com/corpus.txt", "sha256": SHA256}},
        ["spec.corpus: Invalid value", ONE_SOURCE],
        id="path-and-url",
    ),
    pytest.param(
        "TokenizerJob",
        {"corpus": {"path": None}},
        ["spec.corpus: Invalid value", ONE_SOURCE],
        id="no-source",
    ),
    pytest.param(
        "TokenizerJob",
        {"corpus": {"path": None, "url": "https://example.com/corpus.txt"}},
        ["spec.corpus: Invalid value", "sha256 is required with url, and only with url"],
        id="url-without-sha256",
    ),
    pytest.param(
        "TrainingRun",
        {"training": {"warmupSteps": 501}},  # the example trains for 500 steps
        ["spec.training: Invalid value", "warmupSteps must not exceed maxSteps"],
        id="warmup-beyond-max-steps",
    ),
    pytest.param(
        "TokenizerJob",
        {"backoffLimit": -1},
        ["spec.backoffLimit: Invalid value: -1", "should be greater than or equal to 0"],
        id="negative-backoff-limit",
    ),
    pytest.param(
        "TrainingRun",
        {"training": {"maxSteps": -5, "warmupSteps": 0}},
        ["spec.training.maxSteps: Invalid value: -5", "should be greater than or equal to 1"],
        id="negative-max-steps",
    ),
    pytest.param(
        "TokenizerJob",
        {"vocabSize": -1},
        ["spec.vocabSize: Invalid value: -1", "should be greater than or equal to 32"],
        id="negative-vocab-size",
    ),
    pytest.param(
        "TrainingRun",
        {"model": {"dropout": 1.0}},
        ["spec.model.dropout", "should be less than 1"],
        id="dropout-one",
    ),
]


@pytest.mark.parametrize(("kind", "spec_patch", "expected"), INVALID_ON_CREATE)
def test_invalid_spec_is_rejected_on_create(objects, kind, spec_patch, expected):
    body = _manifest(kind, "bad", spec_patch)
    message = _rejection(lambda: objects.create(body))
    for text in expected:
        assert text in message


@pytest.mark.parametrize(
    ("kind", "spec_patch"),
    [
        pytest.param("TokenizerJob", {}, id="example-tokenizer-job"),
        pytest.param("TrainingRun", {}, id="example-training-run"),
        # 256 bytes + 2 special tokens: the smallest vocabulary a byte-level bpe can have.
        pytest.param("TokenizerJob", {"vocabSize": 258}, id="bpe-vocab-at-alphabet"),
        pytest.param("TokenizerJob", {"algorithm": "unigram", "vocabSize": 64}, id="unigram"),
        pytest.param(
            "TokenizerJob",
            {"corpus": {"path": None, "configMapRef": {"name": "text", "key": "corpus.txt"}}},
            id="configmap-source",
        ),
        pytest.param(
            "TrainingRun",
            {"corpus": {"path": None, "url": "https://example.com/c.txt", "sha256": SHA256}},
            id="url-source",
        ),
    ],
)
def test_valid_spec_is_accepted(objects, kind, spec_patch):
    body = _manifest(kind, "good", spec_patch)
    created = objects.create(body)
    spec = _spec(created)
    # Every field sent is kept, and the schema's defaults fill in the rest.
    assert _kept(_spec(body), spec)
    assert spec["backoffLimit"] == 2
    assert spec["cancel"] is False
    # The pydantic model reads back what the API server stored.
    model = TokenizerJob if kind == "TokenizerJob" else TrainingRun
    model.model_validate(created)


MINIMAL_SPECS = [
    pytest.param("TokenizerJob", {"corpus": {"path": "corpus.txt"}}, id="TokenizerJob"),
    pytest.param(
        "TrainingRun",
        {"tokenizerRef": {"name": "tok"}, "corpus": {"path": "corpus.txt"}},
        id="TrainingRun",
    ),
]


@pytest.mark.parametrize(("kind", "spec"), MINIMAL_SPECS)
def test_minimal_spec_gets_the_models_defaults_and_can_be_cancelled(objects, kind, spec):
    """A spec of the required fields alone: the CRD's defaults are the pydantic models' defaults,
    and the CEL rules, which read defaulted fields, hold on create and on update."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": "minimal"}}
    model = TokenizerJob if kind == "TokenizerJob" else TrainingRun
    expected = model.model_validate(body | {"spec": spec}).spec
    created = objects.create(body | {"spec": spec})
    assert model.model_validate(created).spec == expected
    cancelled = objects.patch_spec(kind, "minimal", {"cancel": True})
    assert model.model_validate(cancelled).spec == expected.model_copy(update={"cancel": True})


def test_duplicate_special_tokens_are_rejected(objects):
    body = _manifest("TokenizerJob", "dup", {"specialTokens": ["<|endoftext|>", "<|endoftext|>"]})
    message = _rejection(lambda: objects.create(body))
    assert "spec.specialTokens[1]: Duplicate value" in message


@pytest.mark.parametrize(
    ("kind", "spec_patch", "expected"),
    [
        pytest.param(
            "TrainingRun", {"training": {"maxSteps": 600}}, RUN_IMMUTABLE, id="run-max-steps"
        ),
        pytest.param("TrainingRun", {"model": {"nLayer": 2}}, RUN_IMMUTABLE, id="run-model"),
        pytest.param(
            "TrainingRun", {"tokenizerRef": {"name": "other"}}, RUN_IMMUTABLE, id="run-tokenizer"
        ),
        pytest.param(
            "TrainingRun", {"corpus": {"path": "other.txt"}}, RUN_IMMUTABLE, id="run-corpus"
        ),
        pytest.param(
            "TokenizerJob", {"vocabSize": 5000}, TOKENIZER_IMMUTABLE, id="tokenizer-vocab-size"
        ),
        pytest.param(
            "TokenizerJob",
            {"specialTokens": ["<|endoftext|>"]},
            TOKENIZER_IMMUTABLE,
            id="tokenizer-special-tokens",
        ),
        pytest.param(
            "TokenizerJob", {"corpus": {"path": "other.txt"}}, TOKENIZER_IMMUTABLE, id="t-corpus"
        ),
    ],
)
def test_immutable_field_cannot_change(objects, kind, spec_patch, expected):
    created = objects.create(_manifest(kind, "fixed"))
    message = _rejection(lambda: objects.patch_spec(kind, "fixed", spec_patch))
    assert f'spec: Invalid value: "object": {expected}' in message
    assert _spec(objects.get(kind, "fixed")) == _spec(created)


@pytest.mark.parametrize("kind", sorted(PLURALS))
def test_runtime_settings_stay_mutable(objects, kind):
    objects.create(_manifest(kind, "tuned"))
    patched = objects.patch_spec(
        kind, "tuned", {"backoffLimit": 5, "activeDeadlineSeconds": 3600, "image": "trainer:2"}
    )
    spec = _spec(patched)
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["image"]) == (
        5,
        3600,
        "trainer:2",
    )


@pytest.mark.parametrize("kind", sorted(PLURALS))
def test_cancel_can_be_set_but_not_undone(objects, kind):
    objects.create(_manifest(kind, "job"))
    assert _spec(objects.patch_spec(kind, "job", {"cancel": True}))["cancel"] is True
    message = _rejection(lambda: objects.patch_spec(kind, "job", {"cancel": False}))
    assert 'spec: Invalid value: "object": cancel cannot be undone' in message
    assert _spec(objects.get(kind, "job"))["cancel"] is True
    # Setting it again is no change, and allowed.
    assert _spec(objects.patch_spec(kind, "job", {"cancel": True}))["cancel"] is True


def _assert_every_field_set(model: BaseModel, where: str = "status") -> None:
    """Fail when a field is unset or empty, so that a new status field must join the test."""
    for name, value in model:
        path = f"{where}.{name}"
        assert value is not None and value != [] and value != "", f"{path} is not filled in"
        if isinstance(value, BaseModel):
            _assert_every_field_set(value, path)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _assert_every_field_set(item, path)


def _common_status() -> dict[str, object]:
    return {
        "phase": Phase.RUNNING,
        "reason": "Training",
        "message": "step 120 of 500",
        "conditions": [
            Condition(
                type="Ready",
                status="False",
                reason="Training",
                message="not trained yet",
                last_transition_time="2025-01-02T03:04:05Z",
            ),
            Condition(
                type="HeartbeatLost",
                status="Unknown",
                reason="NoHeartbeat",
                message="no heartbeat for 60 s",
                last_transition_time="2025-01-02T03:05:06Z",
            ),
        ],
        "start_time": "2025-01-02T03:00:00Z",
        "completion_time": "2025-01-02T04:00:00Z",
        "last_heartbeat_time": "2025-01-02T03:59:59Z",
        "progress": Progress(
            step=120,
            total_steps=500,
            percent=24,
            loss=3.25,
            tokens_per_second=1234.5,
            eta_seconds=300.25,
        ),
        "artifacts": ArtifactsStatus(path="ns/trainingruns/x", manifest_sha256=SHA256),
        "attempts": 2,
        "observed_generation": 3,
    }


FULL_STATUSES: list[BaseModel] = [
    TokenizerJobStatus.model_validate(
        _common_status()
        | {
            "stats": TokenizerStats(
                vocab_size=4096,
                holdout_bytes=100_000,
                holdout_tokens=25_000,
                bytes_per_token=4.0,
                unknown_rate=0.001,
                character_coverage=0.999,
                vocab_used_fraction=0.75,
            )
        }
    ),
    TrainingRunStatus.model_validate(
        _common_status()
        | {
            "eval": EvalMetrics(
                loss=2.5, perplexity=12.182493960703473, bits_per_byte=1.125, tokens=65536, step=100
            ),
            "evaluations": [
                EvaluationResult(
                    name="shakespeare",
                    phase=Phase.SUCCEEDED,
                    reason="Evaluated",
                    message="evaluated on 4096 tokens",
                    metrics=EvalMetrics(
                        loss=3.0,
                        perplexity=20.085536923187668,
                        bits_per_byte=1.5,
                        tokens=4096,
                        step=500,
                    ),
                    path="eval/shakespeare/metrics.json",
                    attempts=1,
                    completion_time="2025-01-02T04:10:00Z",
                ),
            ],
        }
    ),
]


@pytest.mark.parametrize("status", FULL_STATUSES, ids=lambda s: type(s).__name__)
def test_full_status_round_trips_through_the_status_subresource(objects, status):
    _assert_every_field_set(status)
    kind = "TokenizerJob" if isinstance(status, TokenizerJobStatus) else "TrainingRun"
    created = objects.create(_manifest(kind, "reported"))
    wire = status.model_dump(mode="json", by_alias=True)
    written = objects.replace_status(created | {"status": wire})
    assert written["status"] == wire
    stored = objects.get(kind, "reported")
    assert stored["status"] == wire  # nothing pruned, nothing defaulted over
    assert _spec(stored) == _spec(created)  # the status subresource leaves spec alone
    model = TokenizerJob if kind == "TokenizerJob" else TrainingRun
    assert model.model_validate(stored).status == status


def test_status_is_not_written_through_the_main_resource(objects):
    created = objects.create(_manifest("TokenizerJob", "plain"))
    body = created | {"status": {"phase": "Succeeded"}}
    replaced = _obj(
        objects.api.replace_namespaced_custom_object(
            GROUP, VERSION, objects.namespace, "tokenizerjobs", "plain", body
        )
    )
    assert "status" not in replaced


def test_status_is_validated(objects):
    created = objects.create(_manifest("TrainingRun", "reported"))
    body = created | {"status": {"phase": "Exploded", "progress": {"percent": 101}}}
    message = _rejection(lambda: objects.replace_status(body))
    assert 'status.phase: Unsupported value: "Exploded"' in message
    assert "status.progress.percent" in message


def test_service_account_token_authenticates_as_the_service_account(
    control_plane, k8s_namespace, tmp_path
):
    kubeconfig = control_plane.service_account_kubeconfig(k8s_namespace, "default", tmp_path / "kc")
    with client_from_kubeconfig(kubeconfig) as api:
        review = client.AuthenticationV1Api(api).create_self_subject_review(
            client.V1SelfSubjectReview()
        )
        assert review.status is not None
        assert review.status.user_info is not None
        username = review.status.user_info.username
        assert username == f"system:serviceaccount:{k8s_namespace}:default"
        # RBAC grants a ServiceAccount nothing by default.
        with pytest.raises(ApiException) as info:
            client.CustomObjectsApi(api).list_namespaced_custom_object(
                GROUP, VERSION, k8s_namespace, "tokenizerjobs"
            )
        assert info.value.status == 403


def test_evaluations_can_be_added_but_not_changed(objects):
    objects.create(_manifest("TrainingRun", "evaluated"))
    request = {"name": "train-split", "split": "train", "maxTokens": 1024}
    added = objects.patch_spec("TrainingRun", "evaluated", {"evaluations": [request]})
    assert _spec(added)["evaluations"] == [request]
    changed = [request | {"maxTokens": 2048}]
    message = _rejection(
        lambda: objects.patch_spec("TrainingRun", "evaluated", {"evaluations": changed})
    )
    assert "spec.evaluations[0]" in message
    assert "an evaluation cannot be changed; add one under a new name" in message
