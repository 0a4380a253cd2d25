"""The trainer pod's side: one resource, Redis reporting, paths kept inside the volume."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from model_trainer import log
from model_trainer.corpus import CorpusContext
from model_trainer.errors import InvalidInputError
from model_trainer.reporting import CancelToken, MultiReporter, NullReporter, Reporter
from model_trainer.resources import Resource, parse_resource
from model_trainer.runner import JobOutcome, run_job

logger = log.get_logger(__name__)


def parse_pod_resource(resource_text: str) -> tuple[Resource, str]:
    """The resource the operator handed the pod (JSON, or YAML by hand), and its UID."""
    try:
        document: object = (
            json.loads(resource_text)
            if resource_text.lstrip().startswith("{")
            else yaml.safe_load(resource_text)
        )
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"the resource is not valid JSON or YAML: {exc}") from None
    resource = parse_resource(document, "resource")
    uid = resource.metadata.uid
    if not uid:
        raise InvalidInputError("the resource has no metadata.uid")
    return resource, uid


def pod_corpus_context(artifacts_root: Path, config_map_dir: Path | None) -> CorpusContext:
    """Corpus paths stay inside the artifacts volume; ConfigMaps come from their mounts."""
    return CorpusContext(
        artifacts_root=artifacts_root, config_map_dir=config_map_dir, allow_absolute_paths=False
    )


def run_pod_job(
    resource_text: str,
    *,
    artifacts_root: Path,
    redis_url: str | None,
    config_map_dir: Path | None,
    attempt: int = 0,
) -> JobOutcome:
    resource, uid = parse_pod_resource(resource_text)
    token = CancelToken()
    token.install_signal_handlers()
    members: list[Reporter] = [NullReporter(token)]
    if redis_url:
        from model_trainer.redis_reporter import RedisReporter

        members.append(RedisReporter(redis_url, uid, attempt=attempt))
    else:
        logger.warning("no_redis", detail="MT_REDIS_URL unset: no status reporting")
    reporter = MultiReporter(members)
    ctx = pod_corpus_context(artifacts_root, config_map_dir)
    try:
        outcome = run_job(resource, artifacts_root, ctx, reporter)
    finally:
        reporter.close()
    return outcome
