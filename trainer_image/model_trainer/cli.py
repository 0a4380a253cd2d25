"""`model-trainer`: local mode, the trainer pod's entry point, evaluation, CRD generation and the
artifact service. Heavy imports stay inside the commands: the operator image, which has no
torch, transformers or tokenizers, runs `model-trainer artifacts serve`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from model_trainer import __version__, log
from model_trainer.artifact_service import commands as artifact_commands
from model_trainer.errors import EXIT_FAILED, EXIT_INVALID_INPUT, TrainerError

logger = log.get_logger("model_trainer.cli")

DEFAULT_POD_ARTIFACTS = "/artifacts"
DEFAULT_POD_CONFIGMAPS = "/etc/model-trainer/configmaps"
TERMINATION_LOG = Path("/dev/termination-log")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-trainer",
        description="Train byte-level BPE tokenizers and small GPT-2 models, locally or in a pod.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MT_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run TokenizerJob and TrainingRun YAML locally, in dependency order"
    )
    run.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        type=Path,
        required=True,
        help="YAML file of TokenizerJobs, TrainingRuns and ConfigMaps (repeatable)",
    )
    run.add_argument("--artifacts", type=Path, required=True, help="artifacts root directory")
    run.add_argument(
        "--redis-url",
        default=None,
        help="also report heartbeats, progress and status to this Redis",
    )

    job = sub.add_parser("job", help="run one resource as the trainer pod does")
    job.add_argument(
        "--resource",
        type=Path,
        default=None,
        help="the resource as YAML or JSON (default: env MT_RESOURCE, JSON)",
    )
    job.add_argument(
        "--artifacts",
        type=Path,
        default=Path(os.environ.get("MT_ARTIFACTS_DIR", DEFAULT_POD_ARTIFACTS)),
    )
    job.add_argument("--redis-url", default=os.environ.get("MT_REDIS_URL") or None)
    job.add_argument(
        "--config-map-dir",
        type=Path,
        default=Path(os.environ.get("MT_CONFIGMAP_DIR", DEFAULT_POD_CONFIGMAPS)),
    )
    job.add_argument("--attempt", type=int, default=int(os.environ.get("MT_ATTEMPT", "0")))
    job.add_argument(
        "--evaluation",
        default=os.environ.get("MT_EVALUATION") or None,
        metavar="NAME",
        help="evaluate the finished model of the TrainingRun on its spec.evaluations entry NAME "
        "instead of training (default: env MT_EVALUATION)",
    )

    ev = sub.add_parser("evaluate", help="evaluate a trained model on a corpus or split")
    ev.add_argument(
        "--model",
        type=Path,
        required=True,
        help="directory with model.safetensors, config.json and tokenizer.json",
    )
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus-path", help="a UTF-8 file or directory")
    source.add_argument(
        "-f",
        "--file",
        type=Path,
        help="a TrainingRun YAML whose corpus and holdoutFraction are used",
    )
    ev.add_argument("--split", choices=["holdout", "train", "all"], default="holdout")
    ev.add_argument("--holdout-fraction", type=float, default=None)
    ev.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="evaluate a fixed sample of this many tokens (default: the TrainingRun's "
        "evaluation.maxTokens with -f, else the whole split)",
    )
    ev.add_argument(
        "--artifacts",
        type=Path,
        default=Path.cwd(),
        help="root that relative corpus paths resolve against",
    )
    ev.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")

    crds = sub.add_parser("crds", help="write the CustomResourceDefinitions")
    crds.add_argument("--out", type=Path, default=Path("crds"))

    val = sub.add_parser("validate", help="check YAML against the resource schemas")
    val.add_argument("-f", "--file", dest="files", action="append", type=Path, required=True)

    artifact_commands.add_parser(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from model_trainer.local import run_files

    files: list[Path] = args.files
    artifacts: Path = args.artifacts
    redis_url: str | None = args.redis_url
    return run_files(files, artifacts.resolve(), redis_url=redis_url)


def _cmd_job(args: argparse.Namespace) -> int:
    resource_file: Path | None = args.resource
    evaluation: str | None = args.evaluation
    try:
        text = (
            resource_file.read_text(encoding="utf-8")
            if resource_file is not None
            else os.environ.get("MT_RESOURCE", "")
        )
        if evaluation is not None:
            from model_trainer.evaluation_job import run_evaluation_pod

            evaluated = run_evaluation_pod(
                text,
                evaluation,
                artifacts_root=args.artifacts,
                redis_url=args.redis_url,
                config_map_dir=args.config_map_dir,
                attempt=args.attempt,
            )
            _write_termination_message(f"{evaluated.reason}: {evaluated.message}")
            return evaluated.exit_code
        from model_trainer.pod import run_pod_job

        outcome = run_pod_job(
            text,
            artifacts_root=args.artifacts,
            redis_url=args.redis_url,
            config_map_dir=args.config_map_dir,
            attempt=args.attempt,
        )
    except TrainerError as exc:
        # Input rejected before the job started: the operator still reads why.
        _write_termination_message(f"{exc.reason}: {exc.message}")
        raise
    _write_termination_message(f"{outcome.reason}: {outcome.message}")
    return outcome.exit_code


def _write_termination_message(message: str) -> None:
    # kubelet copies this file into the pod's terminated state, where the operator reads it.
    try:
        if TERMINATION_LOG.exists():
            TERMINATION_LOG.write_text(message[:4000], encoding="utf-8")
    except OSError:
        pass


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from model_trainer.api import CorpusSource, TrainingRun
    from model_trainer.corpus import CorpusContext
    from model_trainer.lm import evaluate_run_dir
    from model_trainer.resources import load_documents

    artifacts: Path = args.artifacts
    fraction: float | None = args.holdout_fraction
    max_tokens: int | None = args.max_tokens
    config_maps: dict[str, dict[str, str]] = {}
    if args.file is not None:
        docs = load_documents([args.file])
        runs = [r for r in docs.resources if isinstance(r, TrainingRun)]
        if not runs:
            raise TrainerError(f"{args.file} holds no TrainingRun")
        corpus = runs[0].spec.corpus
        fraction = fraction if fraction is not None else runs[0].spec.holdout_fraction
        max_tokens = max_tokens if max_tokens is not None else runs[0].spec.evaluation.max_tokens
        config_maps = docs.config_maps
    else:
        corpus = CorpusSource(path=args.corpus_path)
    ctx = CorpusContext(artifacts_root=artifacts.resolve(), config_maps=config_maps)
    metrics = evaluate_run_dir(
        args.model,
        corpus,
        ctx,
        args.split,
        fraction if fraction is not None else 0.05,
        args.out,
        max_tokens=max_tokens,
    )
    sys.stdout.write(json.dumps(metrics.model_dump(mode="json", by_alias=True), indent=2) + "\n")
    return 0


def _cmd_crds(args: argparse.Namespace) -> int:
    from model_trainer.api.crd import write_all

    for path in write_all(args.out):
        logger.info("crd_written", path=str(path))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from model_trainer.resources import load_documents

    docs = load_documents(args.files)
    for resource in docs.resources:
        logger.info("valid", kind=resource.kind, name=resource.metadata.name)
    return 0


COMMANDS = {
    "run": _cmd_run,
    "job": _cmd_job,
    "evaluate": _cmd_evaluate,
    "crds": _cmd_crds,
    "validate": _cmd_validate,
    "artifacts": artifact_commands.run,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log.configure(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except TrainerError as exc:
        logger.error("error", reason=exc.reason, error=exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return EXIT_FAILED
    except FileNotFoundError as exc:
        logger.error("error", reason="InvalidInput", error=str(exc))
        return EXIT_INVALID_INPUT


if __name__ == "__main__":
    sys.exit(main())
