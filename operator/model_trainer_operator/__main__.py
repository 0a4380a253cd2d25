"""`python -m model_trainer_operator`: run the operator."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from model_trainer import log


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="model-trainer-operator", description=__doc__)
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: MT_OPERATOR_NAMESPACES, else all",
    )
    parser.add_argument("--log-level", default=os.environ.get("MT_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    if args.namespace:
        os.environ["MT_OPERATOR_NAMESPACES"] = ",".join(args.namespace)
    log.configure(level=args.log_level)

    import kopf

    from model_trainer_operator import handlers

    settings = handlers.SETTINGS
    kopf.configure(verbose=args.log_level == "debug", log_format=kopf.LogFormat.JSON)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
