"""Generate the CustomResourceDefinitions from the pydantic models.

Pydantic's JSON Schema is turned into a Kubernetes structural schema: references inlined,
`anyOf [X, null]` collapsed to X, titles dropped, exclusive bounds in OpenAPI v3.0 form, and
CEL rules (`x-kubernetes-validations`) carried over from the models.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, JsonValue

from model_trainer.api.common import GROUP, VERSION
from model_trainer.api.tokenizer_job import TokenizerJobSpec, TokenizerJobStatus
from model_trainer.api.training_run import TrainingRunSpec, TrainingRunStatus

JsonObject = dict[str, JsonValue]
_DROPPED_KEYS = {"title", "additionalProperties", "$defs"}


@dataclass(frozen=True)
class ResourceKind:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    description: str
    printer_columns: tuple[JsonObject, ...]


_COMMON_COLUMNS: tuple[JsonObject, ...] = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress %", "type": "integer", "jsonPath": ".status.progress.percent"},
)
_AGE: JsonObject = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

RESOURCES = (
    ResourceKind(
        kind="TokenizerJob",
        plural="tokenizerjobs",
        singular="tokenizerjob",
        short_names=("tj",),
        spec=TokenizerJobSpec,
        status=TokenizerJobStatus,
        description="Trains a tokenizer on a corpus. Its tokenizer.json lands on the artifacts "
        "volume.",
        printer_columns=(
            *_COMMON_COLUMNS,
            {"name": "Bytes/Token", "type": "number", "jsonPath": ".status.stats.bytesPerToken"},
            _AGE,
        ),
    ),
    ResourceKind(
        kind="TrainingRun",
        plural="trainingruns",
        singular="trainingrun",
        short_names=("tr",),
        spec=TrainingRunSpec,
        status=TrainingRunStatus,
        description="Trains a small GPT-2 model with the tokenizer of a TokenizerJob.",
        printer_columns=(
            *_COMMON_COLUMNS,
            {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
            {
                "name": "Eval BPB",
                "type": "number",
                "jsonPath": ".status.eval.bitsPerByte",
                "priority": 1,
            },
            _AGE,
        ),
    ),
)


def _without_nulls(value: JsonValue) -> JsonValue:
    """A default as the API server takes it: an unset (None) field is left out, not null."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _structural(node: JsonValue, defs: JsonObject) -> JsonValue:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        target = defs[ref.rsplit("/", 1)[-1]]
        merged: JsonObject = dict(target) if isinstance(target, dict) else {}
        merged.update({k: v for k, v in node.items() if k != "$ref"})
        return _structural(merged, defs)
    any_of = node.get("anyOf")
    if isinstance(any_of, list):
        options = [o for o in any_of if not (isinstance(o, dict) and o.get("type") == "null")]
        if len(options) == 1 and isinstance(options[0], dict):
            merged = {k: v for k, v in node.items() if k != "anyOf"}
            merged.update(options[0])
            if merged.get("default", 0) is None:
                del merged["default"]
            return _structural(merged, defs)
    out: JsonObject = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, int | float):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "description" and isinstance(value, str):
            out[key] = " ".join(value.split())
        elif key == "const":
            out["enum"] = [value]
        elif key == "default":
            out[key] = _without_nulls(value)
        else:
            out[key] = _structural(value, defs)
    if out.get("type") == "object" and "properties" not in out:
        props = node.get("additionalProperties")
        if isinstance(props, dict):
            out["additionalProperties"] = _structural(props, defs)
    if "default" in out and out["default"] is None:
        del out["default"]
    return out


def openapi_schema(model: type[BaseModel]) -> JsonObject:
    """The structural OpenAPI v3 schema of a model, as a CRD embeds it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs_raw = raw.get("$defs", {})
    defs: JsonObject = dict(defs_raw) if isinstance(defs_raw, dict) else {}
    result = _structural(raw, defs)
    if not isinstance(result, dict):
        raise TypeError(f"schema of {model.__name__} is not an object")
    return result


def _status_schema(model: type[BaseModel]) -> JsonObject:
    schema = openapi_schema(model)
    properties = schema.get("properties")
    if isinstance(properties, dict):
        conditions = properties.get("conditions")
        if isinstance(conditions, dict):
            conditions["x-kubernetes-list-type"] = "map"
            conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def crd(resource: ResourceKind) -> JsonObject:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{resource.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "model-trainer"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.singular,
                "shortNames": list(resource.short_names),
                "categories": ["modeltrainer", "all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(resource.printer_columns),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": resource.description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": openapi_schema(resource.spec),
                                "status": _status_schema(resource.status),
                            },
                        }
                    },
                }
            ],
        },
    }


def render(resource: ResourceKind) -> str:
    header = "# Generated from model_trainer.api by `make crds`. Do not edit.\n"
    return header + yaml.safe_dump(crd(resource), sort_keys=False, width=100)


def file_name(resource: ResourceKind) -> str:
    return f"{GROUP}_{resource.plural}.yaml"


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for resource in RESOURCES:
        path = directory / file_name(resource)
        path.write_text(render(resource), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "crds"))
