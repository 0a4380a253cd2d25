"""The pydantic models are the source of truth: the CRDs must match them, and bad specs fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, JsonValue, ValidationError

from model_trainer.api import TokenizerJob, TokenizerJobSpec, TrainingRun, TrainingRunSpec
from model_trainer.api.crd import RESOURCES, file_name, openapi_schema, render
from model_trainer.resources import load_documents

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.kind)
def test_committed_crd_matches_models(resource):
    committed = (ROOT / "crds" / file_name(resource)).read_text(encoding="utf-8")
    assert committed == render(resource), "crds/ drifted from the models: run `make crds`"


def _walk(schema: JsonValue, path: str):
    if not isinstance(schema, dict):
        return
    yield path, schema
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for name, sub in properties.items():
            yield from _walk(sub, f"{path}.{name}")
    items = schema.get("items")
    if isinstance(items, dict):
        yield from _walk(items, f"{path}[]")


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.kind)
def test_every_field_is_described_and_structural(resource):
    for part in (resource.spec, resource.status):
        for path, node in _walk(openapi_schema(part), part.__name__):
            if not path.endswith("[]"):
                assert node.get("description"), f"{path} has no description"
            assert "type" in node, f"{path} has no type (not a structural schema)"
            assert "$ref" not in node and "anyOf" not in node, path


def _aliases(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.kind)
def test_crd_declares_every_status_and_spec_field(resource):
    crd = yaml.safe_load((ROOT / "crds" / file_name(resource)).read_text(encoding="utf-8"))
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    assert set(props["spec"]["properties"]) == _aliases(resource.spec)
    assert set(props["status"]["properties"]) == _aliases(resource.status)
    progress = props["status"]["properties"]["progress"]["properties"]
    assert {"step", "totalSteps", "loss", "tokensPerSecond", "etaSeconds"} <= set(progress)


def test_printer_columns():
    for resource in RESOURCES:
        names = [c["name"] for c in resource.printer_columns]
        assert names[:2] == ["Phase", "Progress %"] and names[-1] == "Age"
    assert "Loss" in [c["name"] for c in RESOURCES[1].printer_columns]


@pytest.mark.parametrize("folder", ["demo", "cluster"])
def test_examples_are_valid(folder: str):
    files = sorted((ROOT / "examples" / folder).glob("*.yaml"))
    docs = load_documents([f for f in files if f.name != "kustomization.yaml"])
    kinds = {type(r) for r in docs.resources}
    assert kinds == {TokenizerJob, TrainingRun}


CORPUS = {"path": "corpus.txt"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"corpus": CORPUS, "vocabSize": 200}, "below the byte-level alphabet"),
        ({"corpus": CORPUS, "algorithm": "sentencepiece"}, "algorithm"),
        ({"corpus": {"path": "a", "url": "https://x/y", "sha256": "0" * 64}}, "exactly one"),
        ({"corpus": {}}, "exactly one"),
        ({"corpus": {"url": "https://example.invalid/c.txt"}}, "sha256 is required"),
        ({"corpus": CORPUS, "minFrequency": -1}, "minFrequency"),
        ({"corpus": CORPUS, "holdoutFraction": -0.1}, "holdoutFraction"),
        ({"corpus": CORPUS, "vocabSize": 300, "specialTokens": ["a", "a"]}, "unique"),
        ({"corpus": CORPUS, "vocabulary": 300}, "Extra inputs"),
    ],
)
def test_bad_tokenizer_specs_are_rejected(spec, message):
    with pytest.raises(ValidationError, match=message):
        TokenizerJobSpec.model_validate(spec)


def test_unigram_may_have_a_small_vocab():
    spec = TokenizerJobSpec.model_validate(
        {"corpus": CORPUS, "algorithm": "unigram", "vocabSize": 100}
    )
    assert spec.vocab_size == 100


RUN = {"tokenizerRef": {"name": "tok"}, "corpus": CORPUS}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"model": {"nEmbd": 100, "nHead": 3}}, "divisible by nHead"),
        ({"training": {"maxSteps": 10, "warmupSteps": 20}}, "warmupSteps"),
        ({"training": {"learningRate": -1}}, "learningRate"),
        ({"training": {"batchSize": 0}}, "batchSize"),
        ({"training": {"precision": "fp16"}}, "precision"),
        ({"model": {"dropout": 1.5}}, "dropout"),
        ({"tokenizerRef": {"name": "Bad_Name"}}, "name"),
    ],
)
def test_bad_training_specs_are_rejected(extra, message):
    with pytest.raises(ValidationError, match=message):
        TrainingRunSpec.model_validate({**RUN, **extra})


def test_defaults_and_camel_case_round_trip():
    spec = TrainingRunSpec.model_validate(RUN)
    dumped = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["training"]["gradientAccumulation"] == 1
    assert dumped["model"]["contextLength"] == 256
    assert TrainingRunSpec.model_validate(dumped) == spec
