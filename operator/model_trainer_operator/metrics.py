"""Prometheus metrics of the operator, served on /metrics."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from model_trainer_operator.kinds import KINDS

JOBS = Gauge(
    "modeltrainer_jobs", "Resources the operator tracks, by kind and phase.", ["kind", "phase"]
)
PHASE_DURATION = Histogram(
    "modeltrainer_phase_duration_seconds",
    "Time resources spent in a phase before leaving it.",
    ["kind", "phase"],
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 48 * 3600),
)
RECONCILE_ERRORS = Counter(
    "modeltrainer_reconcile_errors_total", "Reconciliations that raised an error.", ["kind"]
)
RECONCILE_SECONDS = Histogram(
    "modeltrainer_reconcile_duration_seconds",
    "Time one reconciliation took.",
    ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
PODS_CREATED = Counter(
    "modeltrainer_pods_created_total", "Trainer and evaluation pods created.", ["kind", "role"]
)
STATUS_PATCHES = Counter("modeltrainer_status_patches_total", "Status patches sent.", ["kind"])


@dataclass
class _Tracked:
    kind: str
    phase: str
    since: float
    timed: bool
    """False for the phase a resource was in when first seen: its start is unknown."""


class PhaseTracker:
    """Keeps the by-phase gauge and the phase-duration histogram in step with what the
    reconciler sees. The first phase seen of a resource is timed from `first_since` when the
    caller knows when it began (Pending: the creation), else not at all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_uid: dict[str, _Tracked] = {}

    def observe(
        self, uid: str, kind: str, phase: str, now: float, first_since: float | None = None
    ) -> None:
        with self._lock:
            old = self._by_uid.get(uid)
            if old is not None and old.phase == phase:
                return
            if old is not None:
                JOBS.labels(old.kind, old.phase).dec()
                if old.timed:
                    PHASE_DURATION.labels(old.kind, old.phase).observe(max(0.0, now - old.since))
            JOBS.labels(kind, phase).inc()
            if old is None:
                since = first_since if first_since is not None else now
                self._by_uid[uid] = _Tracked(kind, phase, since, timed=first_since is not None)
            else:
                self._by_uid[uid] = _Tracked(kind, phase, now, timed=True)

    def forget(self, uid: str) -> None:
        with self._lock:
            old = self._by_uid.pop(uid, None)
            if old is not None:
                JOBS.labels(old.kind, old.phase).dec()


def serve(port: int) -> None:
    for kind in KINDS:
        # A series from the start, at 0: rate() and alerts then see the first error too.
        RECONCILE_ERRORS.labels(kind)
    if port:
        start_http_server(port)
