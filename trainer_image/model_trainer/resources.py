"""Read the YAML (or JSON) documents that the cluster accepts: TokenizerJobs, TrainingRuns and
the ConfigMaps they reference. Errors name the file, the document and the field."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from model_trainer.api import API_VERSION, TokenizerJob, TrainingRun
from model_trainer.errors import InvalidInputError

Resource = TokenizerJob | TrainingRun


@dataclass
class Documents:
    resources: list[Resource] = field(default_factory=list)
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)


def format_validation_error(exc: ValidationError, where: str) -> str:
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(root)"
        problems.append(f"{location}: {error['msg']}")
    return f"{where} is invalid: " + "; ".join(problems)


def parse_resource(document: object, where: str) -> Resource:
    if not isinstance(document, dict):
        raise InvalidInputError(f"{where} is not a mapping")
    kind = document.get("kind")
    api_version = document.get("apiVersion")
    if api_version != API_VERSION:
        raise InvalidInputError(f"{where}: apiVersion must be {API_VERSION}, got {api_version!r}")
    try:
        if kind == "TokenizerJob":
            return TokenizerJob.model_validate(document)
        if kind == "TrainingRun":
            return TrainingRun.model_validate(document)
    except ValidationError as exc:
        raise InvalidInputError(format_validation_error(exc, where)) from None
    raise InvalidInputError(f"{where}: unknown kind {kind!r}")


def load_documents(paths: Iterable[Path]) -> Documents:
    docs = Documents()
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
            loaded = list(yaml.safe_load_all(text))
        except OSError as exc:
            raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"{path} is not valid YAML: {exc}") from None
        for index, document in enumerate(loaded):
            if document is None:
                continue
            where = f"{path} (document {index + 1})"
            if isinstance(document, dict) and document.get("kind") == "ConfigMap":
                _add_config_map(docs, document, where)
                continue
            docs.resources.append(parse_resource(document, where))
    _check_unique(docs.resources)
    return docs


def _add_config_map(docs: Documents, document: dict[object, object], where: str) -> None:
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    data = document.get("data") or {}
    if not isinstance(name, str) or not isinstance(data, dict):
        raise InvalidInputError(f"{where}: a ConfigMap needs metadata.name and data")
    docs.config_maps[name] = {str(k): str(v) for k, v in data.items()}


def _check_unique(resources: list[Resource]) -> None:
    seen: set[tuple[str, str, str]] = set()
    for resource in resources:
        key = (resource.kind, resource.metadata.namespace, resource.metadata.name)
        if key in seen:
            raise InvalidInputError(f"{resource.kind} {resource.metadata.name} is given twice")
        seen.add(key)


def dependency_order(resources: list[Resource]) -> list[Resource]:
    """TokenizerJobs first, then the TrainingRuns that use them, each group in file order."""
    tokenizers = [r for r in resources if isinstance(r, TokenizerJob)]
    runs = [r for r in resources if isinstance(r, TrainingRun)]
    return [*tokenizers, *runs]
