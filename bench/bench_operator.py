"""Operator latency, status lag and memory against a real API server.

    uv run --no-sync python bench/bench_operator.py [--runs 50] [--live 200] [--settle 30]

Starts etcd + kube-apiserver (tests/controlplane.py), a redis-server and the operator as its
ServiceAccount with operator/deploy/rbac.yaml, all in a temporary directory, with the operator's
default settings, and plays the kubelet and the trainers (there is neither here):

1. creation -> pod: --runs TrainingRuns, one at a time, each --spacing after the previous one's
   pod appeared; the latency is from the create call's return to the pod's ADDED event on a pod
   watch. Their TokenizerJob is Succeeded before the operator starts.
2. heartbeat -> status: --heartbeat-jobs of them get Running pods and heartbeats every
   --heartbeat-interval (+-25%, so that no job locks onto one phase of the operator's timer).
   lastHeartbeatTime has 1-second resolution, so each heartbeat is written with the current
   time t, at most one per job per second, and its write is remembered under floor(t). When a
   watch event shows a job's lastHeartbeatTime change to second S, the lag is (the event's
   arrival) - (the write remembered under S): exactly the write the status reflects, to the
   millisecond. A write that a newer one overtook before the operator read it has no lag; the
   fraction of writes a status showed is reported beside the lags.
3. memory: the TrainingRuns are topped up to --live in one burst (their creation -> pod
   latencies are the burst figures), every pod is set Running, and every trainer writes a
   heartbeat and progress every --heartbeat-interval. Once all are Running in status, the
   operator runs for --settle seconds; over that window we take its CPU use (and the API
   server's, etcd's, our own and the whole machine's: the rest is outside load, which slows
   everything), the API request rate and latency, its reconcile and status patch rates, the
   heartbeat lag and its RSS every second, and at the end its VmRSS, VmHWM and open sockets.

The result is logged as JSON and written to bench/results/operator.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kubernetes import client
from pydantic import JsonValue

ROOT = Path(__file__).resolve().parents[1]
# The control plane of the tests, reused as it is.
sys.path.insert(0, str(ROOT / "tests"))

from controlplane import ControlPlane, free_port  # noqa: E402
from model_trainer import log, protocol  # noqa: E402
from model_trainer.api import GROUP, VERSION  # noqa: E402
from model_trainer.api.common import Progress  # noqa: E402
from model_trainer.artifacts import atomic_write_json  # noqa: E402
from redis_server import RedisServer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "operator.json"
RBAC_FILE = ROOT / "operator" / "deploy" / "rbac.yaml"
OPERATOR_NAMESPACE = "model-trainer-system"
OPERATOR_SA = "model-trainer-operator"
NAMESPACE = "bench"
PLURAL = "trainingruns"
TOKENIZER = "tok"
LABEL_UID = "modeltrainer.io/uid"
POD_SELECTOR = "app.kubernetes.io/managed-by=model-trainer-operator"
TARGET_CREATE_P50 = 1.0
TARGET_LAG_P50 = 2.0
TARGET_RSS_MB = 250.0
POD_TIMEOUT = 30.0
RUN_SPEC: dict[str, JsonValue] = {
    "tokenizerRef": {"name": TOKENIZER},
    "corpus": {"configMapRef": {"name": "corpus", "key": "text"}},
    "model": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "contextLength": 32},
    "training": {"maxSteps": 1000, "batchSize": 4},
}
TOKENIZER_SPEC: dict[str, JsonValue] = {
    "vocabSize": 400,
    "corpus": {"configMapRef": {"name": "corpus", "key": "text"}},
}

logger = log.get_logger("bench.operator")


def _get(node: object, *path: str) -> object:
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics; inf for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("inf")
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def percentiles(values: list[float]) -> dict[str, JsonValue]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(quantile(values, 0.50), 4),
        "p99": round(quantile(values, 0.99), 4),
        "max": round(max(values), 4),
        "mean": round(sum(values) / len(values), 4),
    }


# -- what the watches saw ----------------------------------------------------------------------


@dataclass
class Observed:
    """Everything the watches and the trainers record, under one lock."""

    lock: threading.Condition = field(default_factory=threading.Condition)
    pod_seen: dict[str, float] = field(default_factory=dict)
    """Owner uid -> arrival time of its first pod's event."""
    pod_name: dict[str, str] = field(default_factory=dict)
    phase: dict[str, str] = field(default_factory=dict)
    """TrainingRun name -> status.phase."""
    shown_heartbeat: dict[str, str] = field(default_factory=dict)
    writes: dict[str, dict[int, float]] = field(default_factory=dict)
    """uid -> floor(t) -> t of each heartbeat written."""
    lags: list[tuple[float, float]] = field(default_factory=list)
    """(arrival, lag) of every lastHeartbeatTime change that matched a write."""
    writes_done: list[float] = field(default_factory=list)

    def on_pod(self, kind: str, pod: object, arrived: float) -> None:
        uid = _str(_get(pod, "metadata", "labels", LABEL_UID))
        if kind == "DELETED" or not uid:
            return
        with self.lock:
            if uid not in self.pod_seen:
                self.pod_seen[uid] = arrived
                self.pod_name[uid] = _str(_get(pod, "metadata", "name"))
                self.lock.notify_all()

    def on_run(self, kind: str, run: object, arrived: float) -> None:
        name = _str(_get(run, "metadata", "name"))
        uid = _str(_get(run, "metadata", "uid"))
        if kind == "DELETED" or not name:
            return
        shown = _str(_get(run, "status", "lastHeartbeatTime"))
        with self.lock:
            self.phase[name] = _str(_get(run, "status", "phase"))
            if shown and shown != self.shown_heartbeat.get(name):
                self.shown_heartbeat[name] = shown
                second = int(datetime.fromisoformat(shown.replace("Z", "+00:00")).timestamp())
                written = self.writes.get(uid, {}).get(second)
                if written is not None:
                    self.lags.append((arrived, arrived - written))
            self.lock.notify_all()

    def wait(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
                self.lock.wait(min(left, 1.0))

    def lags_between(self, start: float, end: float) -> list[float]:
        with self.lock:
            return [lag for arrived, lag in self.lags if start <= arrived <= end]

    def reflected(self, start: float, end: float) -> float | None:
        """The fraction of the heartbeats written in [start, end] that a status showed."""
        with self.lock:
            written = sum(1 for t in self.writes_done if start <= t <= end)
            shown = sum(1 for arrived, lag in self.lags if start <= arrived - lag <= end)
        return round(shown / written, 3) if written else None


class Watch(threading.Thread):
    """A raw watch stream (one JSON event a line); `handle(type, object, arrival time)`."""

    def __init__(
        self,
        plane: ControlPlane,
        path: str,
        handle: Callable[[str, object, float], None],
        selector: str = "",
    ) -> None:
        super().__init__(daemon=True, name=f"watch {path}")
        self.plane = plane
        self.path = path
        self.selector = selector
        self.handle = handle
        self.stopping = threading.Event()
        self.context = ssl.create_default_context(cafile=str(plane.ca_file))
        self.context.check_hostname = False  # the serving certificate names no IP address

    def run(self) -> None:
        version = ""
        while not self.stopping.is_set():
            query = {"watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": "600"}
            if self.selector:
                query["labelSelector"] = self.selector
            if version:
                query["resourceVersion"] = version
            url = f"{self.plane.server}{self.path}?{urllib.parse.urlencode(query)}"
            request = urllib.request.Request(
                url, headers={"Authorization": f"Bearer {self.plane.admin_token}"}
            )
            try:
                with urllib.request.urlopen(request, context=self.context) as response:
                    for line in response:
                        arrived = time.time()
                        event = json.loads(line)
                        kind = _str(_get(event, "type"))
                        if kind == "ERROR":  # 410 Gone: start over from the current state
                            version = ""
                            break
                        version = _str(_get(event, "object", "metadata", "resourceVersion"))
                        if kind != "BOOKMARK":
                            self.handle(kind, _get(event, "object"), arrived)
            except (OSError, ValueError) as exc:
                if not self.stopping.is_set():
                    logger.warning("watch_interrupted", path=self.path, error=str(exc))
                    time.sleep(0.2)


class Trainers(threading.Thread):
    """Plays the trainers: each writes a heartbeat and its progress every `interval` (+-25%),
    like independent pods. `interval` must be over 1.33 s (distinct seconds)."""

    def __init__(self, redis_url: str, observed: Observed, interval: float) -> None:
        super().__init__(daemon=True, name="trainers")
        self.redis = protocol.connect(redis_url)
        self.observed = observed
        self.interval = interval
        self.stopping = threading.Event()
        self.queue: list[tuple[float, str, int]] = []
        self.queue_lock = threading.Lock()

    def add(self, uid: str) -> None:
        with self.queue_lock:
            heapq.heappush(self.queue, (time.time() + random.uniform(0, self.interval), uid, 0))

    def run(self) -> None:
        while not self.stopping.is_set():
            with self.queue_lock:
                due = self.queue[0][0] if self.queue else time.time() + 0.05
            if due > time.time():
                self.stopping.wait(min(due - time.time(), 0.05))
                continue
            with self.queue_lock:
                _, uid, step = heapq.heappop(self.queue)
            now = time.time()
            with self.observed.lock:
                self.observed.writes.setdefault(uid, {})[int(now)] = now
                self.observed.writes_done.append(now)
            protocol.write_heartbeat(self.redis, uid, now)
            protocol.write_progress(
                self.redis, uid, Progress(step=step, total_steps=1000, percent=step // 10)
            )
            # From this write, not from `due`, so two writes of a job never share a second; the
            # jitter keeps each job's writes from locking onto one phase of the operator's timer.
            jitter = random.uniform(-0.25, 0.25) * self.interval
            with self.queue_lock:
                heapq.heappush(self.queue, (now + self.interval + jitter, uid, min(step + 1, 1000)))


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Operator:
    process: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _http_text(url: str, token: str = "", context: ssl.SSLContext | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        body: bytes = response.read()
        return body.decode()


def install_rbac(plane: ControlPlane) -> Path:
    """operator/deploy/rbac.yaml as it is; returns the ServiceAccount's kubeconfig."""
    assert plane.bin_dir is not None
    with plane.api_client() as api:
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=OPERATOR_NAMESPACE))
        )
    kubectl = [str(plane.bin_dir / "kubectl"), "--kubeconfig", str(plane.admin_kubeconfig)]
    subprocess.run([*kubectl, "apply", "-f", str(RBAC_FILE)], check=True, capture_output=True)
    path = plane.workdir / "operator.kubeconfig"
    return plane.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SA, path)


@contextmanager
def running_operator(
    kubeconfig: Path, redis_url: str, workdir: Path, settings: Mapping[str, str]
) -> Iterator[Operator]:
    health_port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "KUBECONFIG": str(kubeconfig),
            "MT_OPERATOR_REDIS_URL": redis_url,
            "MT_OPERATOR_HEALTH_PORT": str(health_port),
            "MT_OPERATOR_METRICS_PORT": str(free_port()),
            "MT_OPERATOR_TRAINER_IMAGE": "model-trainer/trainer:bench",
        }
    )
    env.update({f"MT_OPERATOR_{k.upper()}": v for k, v in settings.items()})
    log_path = workdir / "operator.log"
    with log_path.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "model_trainer_operator", "--namespace", NAMESPACE],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    operator = Operator(process, int(env["MT_OPERATOR_METRICS_PORT"]), log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the operator exited:\n{operator.log_tail()}")
            try:
                _http_text(f"http://127.0.0.1:{health_port}/healthz")
                break
            except OSError:
                if time.monotonic() > deadline:
                    tail = operator.log_tail()
                    raise RuntimeError(f"the operator never got healthy:\n{tail}") from None
                time.sleep(0.2)
        yield operator
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# -- /proc and /metrics ------------------------------------------------------------------------


def proc_status_mb(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM (MB) and Threads of a process."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
        elif key == "Threads":
            values[key] = int(rest)
    return values


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine, all cores (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def open_sockets(pid: int) -> int:
    """Sockets the process holds: nearly all are its HTTPS connections to the API server."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += fd.readlink().name.startswith("socket:")
        except OSError:
            continue  # closed meanwhile
    return count


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def prometheus(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and match.group(1) == name:
            labels = dict(LABEL.findall(match.group(2) or ""))
            samples.append((labels, float(match.group(3))))
    return samples


def api_requests(plane: ControlPlane) -> dict[str, tuple[float, float]]:
    """Requests served and the seconds they took, by "VERB resource[/subresource]"."""
    context = ssl.create_default_context(cafile=str(plane.ca_file))
    context.check_hostname = False
    text = _http_text(f"{plane.server}/metrics", plane.admin_token, context)
    totals: dict[str, tuple[float, float]] = {}
    for name, index in (
        ("apiserver_request_total", 0),
        ("apiserver_request_duration_seconds_sum", 1),
    ):
        for labels, value in prometheus(text, name):
            resource = labels.get("resource", "")
            if labels.get("subresource"):
                resource += "/" + labels["subresource"]
            key = f"{labels.get('verb', '')} {resource}"
            pair = list(totals.get(key, (0.0, 0.0)))
            pair[index] += value
            totals[key] = (pair[0], pair[1])
    return totals


def operator_counters(operator: Operator) -> dict[str, float]:
    text = _http_text(f"http://127.0.0.1:{operator.metrics_port}/metrics")
    wanted = {
        "reconciles": "modeltrainer_reconcile_duration_seconds_count",
        "reconcile_seconds": "modeltrainer_reconcile_duration_seconds_sum",
        "status_patches": "modeltrainer_status_patches_total",
        "reconcile_errors": "modeltrainer_reconcile_errors_total",
    }
    return {
        key: sum(v for labels, v in prometheus(text, name) if labels.get("kind") == "TrainingRun")
        for key, name in wanted.items()
    }


# -- the cluster side --------------------------------------------------------------------------


class Bench:
    def __init__(self, plane: ControlPlane, api: client.ApiClient, observed: Observed) -> None:
        self.plane = plane
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.observed = observed
        self.uids: dict[str, str] = {}
        self.created: dict[str, float] = {}
        self.running: set[str] = set()

    def create_run(self, name: str) -> str:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "metadata": {"name": name},
            "spec": RUN_SPEC,
        }
        made = self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
        self.created[name] = time.time()
        uid = _str(_get(made, "metadata", "uid"))
        self.uids[name] = uid
        return uid

    def pod_latency(self, name: str) -> float:
        return self.observed.pod_seen[self.uids[name]] - self.created[name]

    def wait_pods(self, names: list[str], timeout: float = POD_TIMEOUT) -> None:
        uids = [self.uids[n] for n in names]
        self.observed.wait(
            f"the pods of {len(names)} TrainingRuns",
            lambda: all(u in self.observed.pod_seen for u in uids),
            timeout,
        )

    def set_running(self, name: str, trainers: Trainers) -> None:
        """Play the kubelet (pod Running) and start the trainer's heartbeats."""
        uid = self.uids[name]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        container = {
            "name": "trainer",
            "image": "model-trainer/trainer:bench",
            "imageID": "",
            "ready": True,
            "restartCount": 0,
            "state": {"running": {"startedAt": now}},
        }
        status = {"phase": "Running", "startTime": now, "containerStatuses": [container]}
        self.core.patch_namespaced_pod_status(
            self.observed.pod_name[uid], NAMESPACE, {"status": status}
        )
        self.running.add(name)
        trainers.add(uid)

    def wait_phase(self, names: list[str], phase: str, timeout: float) -> None:
        self.observed.wait(
            f"{len(names)} TrainingRuns to be {phase}",
            lambda: all(self.observed.phase.get(n) == phase for n in names),
            timeout,
        )


def setup_tokenizer(plane: ControlPlane, api: client.ApiClient) -> None:
    """The namespace and a Succeeded TokenizerJob, before the operator starts (no race)."""
    plane.create_namespace(NAMESPACE)
    custom = client.CustomObjectsApi(api)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TokenizerJob",
        "metadata": {"name": TOKENIZER},
        "spec": TOKENIZER_SPEC,
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "tokenizerjobs", body)
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        NAMESPACE,
        "tokenizerjobs",
        TOKENIZER,
        {"status": {"phase": "Succeeded", "reason": "Succeeded", "attempts": 1}},
    )


# -- the three measurements --------------------------------------------------------------------


def measure_creation(bench: Bench, runs: int, spacing: float) -> list[float]:
    latencies = []
    for index in range(runs):
        name = f"run-{index:03d}"
        bench.create_run(name)
        bench.wait_pods([name])
        latencies.append(bench.pod_latency(name))
        time.sleep(spacing)
    return latencies


def measure_lag(
    bench: Bench, trainers: Trainers, names: list[str], samples: int, interval: float
) -> tuple[list[float], float | None]:
    """Returns the lags and the fraction of heartbeats written that the status showed."""
    for name in names:
        bench.set_running(name, trainers)
    bench.wait_phase(names, "Running", timeout=60)
    observed = bench.observed
    start = time.time() + interval  # writes from now on; the first status change may be older
    timeout = 60 + 3 * interval * samples / max(1, len(names))
    observed.wait(
        f"{samples} heartbeat samples",
        lambda: (
            sum(1 for arrived, _ in observed.lags if arrived >= start) >= samples
            and time.time() > start + 4 * interval
        ),  # leaves writes to count for `reflected`
        timeout,
    )
    end = time.time()
    # A write in the last few seconds may not be shown yet: leave those out of the fraction.
    return observed.lags_between(start, end), observed.reflected(start, end - 3 * interval)


@dataclass
class Window:
    seconds: float
    cpu: dict[str, float]
    api: dict[str, tuple[float, float]]
    """"VERB resource" -> (requests per second, mean latency in ms)."""
    operator: dict[str, float]


def _api_rates(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], elapsed: float
) -> dict[str, tuple[float, float]]:
    rates = {}
    for key, (total, spent) in after.items():
        count = total - before.get(key, (0.0, 0.0))[0]
        seconds = spent - before.get(key, (0.0, 0.0))[1]
        # A WATCH counts when it ends; its rate and duration say nothing about load.
        if count > 0 and not key.startswith("WATCH "):
            rates[key] = (count / elapsed, seconds / count * 1000)
    return rates


def measure_window(
    plane: ControlPlane, operator: Operator, seconds: float, rss_samples: list[float]
) -> Window:
    pids = {
        "operator": operator.process.pid,
        "kube_apiserver": plane.apiserver.pid if plane.apiserver else 0,
        "etcd": plane.etcd.pid if plane.etcd else 0,
        "bench": os.getpid(),
    }
    cpu0 = {k: proc_cpu_seconds(p) for k, p in pids.items() if p}
    cpu0["machine"] = machine_cpu_seconds()
    api0, op0 = api_requests(plane), operator_counters(operator)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        rss_samples.append(proc_status_mb(operator.process.pid)["VmRSS"])
        time.sleep(1.0)
    elapsed = time.monotonic() - started
    cpu1 = {k: proc_cpu_seconds(p) for k, p in pids.items() if p}
    cpu1["machine"] = machine_cpu_seconds()
    api1, op1 = api_requests(plane), operator_counters(operator)
    return Window(
        seconds=elapsed,
        cpu={k: (cpu1[k] - cpu0[k]) / elapsed * 100 for k in cpu0},
        api=_api_rates(api0, api1, elapsed),
        operator={k: op1[k] - op0.get(k, 0.0) for k in op1},
    )


# -- main --------------------------------------------------------------------------------------


def _settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--setting wants NAME=VALUE, got {pair!r}")
        settings[key.strip()] = value.strip()
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="sequential creations timed")
    parser.add_argument("--spacing", type=float, default=0.2, help="seconds between creations")
    parser.add_argument("--live", type=int, default=200, help="TrainingRuns live at the end")
    parser.add_argument("--heartbeat-jobs", type=int, default=10)
    parser.add_argument("--heartbeat-samples", type=int, default=100)
    parser.add_argument("--heartbeat-interval", type=float, default=2.0)
    parser.add_argument("--settle", type=float, default=30.0, help="seconds measured at --live")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an operator setting (MT_OPERATOR_NAME), e.g. reconcile_interval_seconds=2",
    )
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    log.configure()
    runs = max(1, args.runs)
    live = max(runs, args.live)
    jobs = max(1, min(args.heartbeat_jobs, runs))
    interval: float = args.heartbeat_interval
    if interval < 1.4:
        parser.error("--heartbeat-interval must be at least 1.4 s: one write per second at most")
    settings = _settings(args.setting)
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is required: apt-get install redis-server")
    started = time.monotonic()

    with ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-op-")))
        else:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        plane = ControlPlane(workdir / "k8s")
        stack.callback(plane.stop)
        plane.start()
        plane.apply_crds()
        redis_process = RedisServer(redis_server, workdir)
        redis_process.start()
        stack.callback(redis_process.stop)
        redis_url = redis_process.url
        api = stack.enter_context(plane.api_client())
        kubeconfig = install_rbac(plane)
        setup_tokenizer(plane, api)

        observed = Observed()
        watches = [
            Watch(plane, f"/api/v1/namespaces/{NAMESPACE}/pods", observed.on_pod, POD_SELECTOR),
            Watch(
                plane, f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}", observed.on_run
            ),
        ]
        for watch in watches:
            watch.start()
            stack.callback(watch.stopping.set)
        trainers = Trainers(redis_url, observed, interval)
        trainers.start()
        stack.callback(trainers.stopping.set)
        bench = Bench(plane, api, observed)
        setup_seconds = time.monotonic() - started

        operator = stack.enter_context(running_operator(kubeconfig, redis_url, workdir, settings))
        pid = operator.process.pid
        idle = proc_status_mb(pid)
        logger.info("operator_started", setup_seconds=round(setup_seconds, 1), rss_mb=idle)

        sequential = measure_creation(bench, runs, args.spacing)
        logger.info("creation_to_pod", **percentiles(sequential))
        after_creation = proc_status_mb(pid)

        names = sorted(bench.uids)
        lags, reflected = measure_lag(
            bench, trainers, names[:jobs], args.heartbeat_samples, interval
        )
        logger.info("heartbeat_lag", reflected=reflected, **percentiles(lags))

        burst_names = [f"live-{i:03d}" for i in range(live - runs)]
        burst_started = time.monotonic()
        for name in burst_names:
            bench.create_run(name)
        create_seconds = time.monotonic() - burst_started
        bench.wait_pods(burst_names, timeout=POD_TIMEOUT + 2 * live)
        burst = [bench.pod_latency(n) for n in burst_names]
        logger.info(
            "burst_creation_to_pod", created_in=round(create_seconds, 2), **percentiles(burst)
        )
        all_names = sorted(bench.uids)
        for name in all_names:
            if name not in bench.running:
                bench.set_running(name, trainers)
        running_started = time.monotonic()
        bench.wait_phase(all_names, "Running", timeout=120 + live)
        to_running = time.monotonic() - running_started
        logger.info("all_running", live=len(all_names), seconds=round(to_running, 1))

        rss_samples: list[float] = []
        window_start = time.time()
        window = measure_window(plane, operator, args.settle, rss_samples)
        window_end = time.time()
        final = proc_status_mb(pid)
        sockets = open_sockets(pid)
        live_lags = observed.lags_between(window_start, window_end)
        live_reflected = observed.reflected(window_start, window_end - 3 * interval)
        errors = window.operator.get("reconcile_errors", 0.0)
        reconciles = window.operator.get("reconciles", 0.0)

    create_p50 = quantile(sequential, 0.5)
    lag_p50 = quantile(lags, 0.5)
    result: dict[str, JsonValue] = {
        "benchmark": "operator",
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": {
            "runs": runs,
            "spacing_seconds": args.spacing,
            "live": live,
            "heartbeat_jobs": jobs,
            "heartbeat_samples": args.heartbeat_samples,
            "heartbeat_interval_seconds": interval,
            "settle_seconds": args.settle,
            "operator_settings": dict(settings) or "defaults",
        },
        "creation_to_pod_seconds": {
            "sequential": percentiles(sequential),
            "burst": {**percentiles(burst), "created_in_seconds": round(create_seconds, 3)},
        },
        "heartbeat_lag_seconds": {
            "method": "status.lastHeartbeatTime change seen on a watch minus the time of the one "
            "heartbeat written in that second (one write per job per second at most)",
            f"{jobs}_running": {**percentiles(lags), "reflected_fraction": reflected},
            f"{live}_live": {
                **percentiles(live_lags),
                "reflected_fraction": live_reflected,
            },
        },
        "operator_at_live": {
            "live_trainingruns": len(all_names),
            "seconds_to_all_running": round(to_running, 2),
            "window_seconds": round(window.seconds, 1),
            "rss_mb": round(final["VmRSS"], 1),
            "hwm_mb": round(final["VmHWM"], 1),
            "rss_max_in_window_mb": round(max(rss_samples, default=0.0), 1),
            # Every tenth of the window, to tell growth from a plateau.
            "rss_in_window_mb": [
                round(v, 1) for v in rss_samples[:: max(1, len(rss_samples) // 10)]
            ],
            "rss_idle_mb": round(idle["VmRSS"], 1),
            "rss_after_creation_mb": round(after_creation["VmRSS"], 1),
            "threads": int(final["Threads"]),
            "open_sockets": sockets,
            # "machine" is every core's busy time: what is over the sum of the others is load
            # from outside the benchmark, which slows all of it.
            "cpu_percent_of_one_core": {k: round(v, 1) for k, v in window.cpu.items()},
            "reconciles_per_second": round(reconciles / window.seconds, 1),
            "reconcile_ms_mean": round(
                window.operator.get("reconcile_seconds", 0.0) / reconciles * 1000, 2
            )
            if reconciles
            else None,
            "status_patches_per_second": round(
                window.operator.get("status_patches", 0.0) / window.seconds, 1
            ),
            "reconcile_errors": errors,
            "api_requests_per_second": round(sum(rate for rate, _ in window.api.values()), 1),
            "api_requests_by_kind": {
                key: {"per_second": round(rate, 2), "mean_ms": round(ms, 1)}
                for key, (rate, ms) in sorted(window.api.items(), key=lambda kv: -kv[1][0])
            },
        },
        "targets": {
            "creation_to_pod_p50_seconds": TARGET_CREATE_P50,
            "heartbeat_lag_p50_seconds": TARGET_LAG_P50,
            "rss_mb": TARGET_RSS_MB,
            "creation_met": create_p50 <= TARGET_CREATE_P50,
            "lag_met": lag_p50 <= TARGET_LAG_P50,
            "rss_met": final["VmRSS"] <= TARGET_RSS_MB,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results, result)
    logger.info("operator_benchmark", results=str(args.results), **result)


if __name__ == "__main__":
    main()
