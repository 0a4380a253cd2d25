"""A real Kubernetes control plane for tests: etcd and kube-apiserver on free local ports.

There is no scheduler, kubelet, controller-manager or garbage collector: pods stay Pending,
namespaces are never finalized, and ServiceAccounts are not created for you. Give every test its
own namespace and do not delete it.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from kubernetes import client, config
from kubernetes.client import ApiException

from model_trainer import log

logger = log.get_logger(__name__)

ROOT = Path(__file__).resolve().parent.parent
K8S_TOOLS = ROOT / "scripts" / "k8s_tools.sh"
HELM_TOOL = ROOT / "scripts" / "helm_tool.sh"
CRD_DIR = ROOT / "crds"
# The issuer of ServiceAccount tokens and the audience the API server accepts.
AUDIENCE = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
READY_TIMEOUT_SECONDS = 90.0
CRD_TIMEOUT_SECONDS = 30.0
LOG_TAIL_CHARS = 4000
START_ATTEMPTS = 3


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or used."""


def _built_tool(script: Path) -> Path:
    """What a scripts/*_tool(s).sh builder prints last: the path of what it built or found."""
    result = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, check=False, cwd=ROOT
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise ControlPlaneError(
            f"{script.relative_to(ROOT)} failed with exit code {result.returncode}:\n"
            f"{result.stderr[-LOG_TAIL_CHARS:]}"
        )
    return Path(lines[-1])


def k8s_bin_dir() -> Path:
    """The directory with etcd and kube-apiserver that scripts/k8s_tools.sh builds or finds."""
    return _built_tool(K8S_TOOLS)


def helm_binary() -> Path:
    """The pinned Helm CLI that scripts/helm_tool.sh builds (or $HELM)."""
    return _built_tool(HELM_TOOL)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path) -> str:
    if not path.exists():
        return f"({path.name}: no log)"
    text = path.read_text(errors="replace")
    return f"--- {path.name} (last {LOG_TAIL_CHARS} chars) ---\n{text[-LOG_TAIL_CHARS:]}"


def _stop_process(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _kubeconfig(server: str, ca_file: Path, user: str, token: str, namespace: str) -> str:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {"server": server, "certificate-authority": str(ca_file)},
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": "test",
                "context": {"cluster": "test", "user": user, "namespace": namespace},
            }
        ],
        "current-context": "test",
    }
    return yaml.safe_dump(document, sort_keys=False)


def client_from_kubeconfig(path: Path) -> client.ApiClient:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=configuration)
    return client.ApiClient(configuration)


class ControlPlane:
    """etcd and kube-apiserver with RBAC, a token-authenticated admin and ServiceAccount tokens."""

    def __init__(self, workdir: Path, bin_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.admin_token = secrets.token_hex(16)
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        self.secure_port = 0
        self.startup_seconds = 0.0

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.secure_port}"

    @property
    def cert_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def ca_file(self) -> Path:
        # kube-apiserver writes its self-signed serving certificate followed by the CA that signed
        # it; trusting the whole file trusts that CA.
        return self.cert_dir / "apiserver.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def etcd_log(self) -> Path:
        return self.workdir / "etcd.log"

    @property
    def apiserver_log(self) -> Path:
        return self.workdir / "kube-apiserver.log"

    def log_tail(self) -> str:
        return f"{_tail(self.apiserver_log)}\n{_tail(self.etcd_log)}"

    def start(self) -> None:
        """Start etcd and kube-apiserver and wait for /readyz; raise ControlPlaneError if not."""
        began = time.monotonic()
        if self.bin_dir is None:
            self.bin_dir = k8s_bin_dir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_credentials()
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_processes()
                self._wait_ready()
                break
            except ControlPlaneError:
                self.stop()
                # A free port can be taken by someone else before etcd or the API server binds it.
                port_taken = "address already in use" in self.log_tail()
                if attempt == START_ATTEMPTS or not port_taken:
                    raise
        self.admin_kubeconfig.write_text(
            _kubeconfig(self.server, self.ca_file, "admin", self.admin_token, "default")
        )
        self.startup_seconds = time.monotonic() - began
        logger.info("control_plane_ready", server=self.server, seconds=self.startup_seconds)

    def stop(self) -> None:
        apiserver, self.apiserver = self.apiserver, None
        etcd, self.etcd = self.etcd, None
        _stop_process(apiserver)
        _stop_process(etcd)

    def _write_credentials(self) -> None:
        key = self.workdir / "sa.key"
        if not key.exists():
            public = self.workdir / "sa.pub"
            make_key = ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout"]
            for command in (
                [*make_key, "-out", str(key)],
                ["openssl", "ec", "-in", str(key), "-pubout", "-out", str(public)],
            ):
                try:
                    subprocess.run(command, capture_output=True, check=True)
                except (OSError, subprocess.CalledProcessError) as exc:
                    stderr = getattr(exc, "stderr", b"") or b""
                    raise ControlPlaneError(
                        f"could not make the ServiceAccount signing key with openssl: {exc} "
                        f"{stderr.decode(errors='replace')}"
                    ) from exc
        # Static token: the admin is in system:masters, which RBAC lets do anything.
        (self.workdir / "tokens.csv").write_text(f"{self.admin_token},admin,admin,system:masters\n")

    def _start_processes(self) -> None:
        assert self.bin_dir is not None
        client_port, peer_port, self.secure_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        data_dir = self.workdir / "etcd-data"
        # A failed attempt's data names its peer URL; a fresh member needs a fresh directory.
        shutil.rmtree(data_dir, ignore_errors=True)
        etcd_args = [
            str(self.bin_dir / "etcd"),
            "--name=test",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}",
            "--initial-cluster-state=new",
            # Test data need not survive a crash of the machine; fsync would dominate startup.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]
        apiserver_args = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.secure_port}",
            f"--cert-dir={self.cert_dir}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            f"--service-account-issuer={AUDIENCE}",
            f"--service-account-key-file={self.workdir / 'sa.pub'}",
            f"--service-account-signing-key-file={self.workdir / 'sa.key'}",
            f"--api-audiences={AUDIENCE}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--allow-privileged=true",
            # Priority and fairness only costs startup time in a single-client test cluster.
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ]
        with self.etcd_log.open("wb") as etcd_log:
            self.etcd = subprocess.Popen(
                etcd_args, stdin=subprocess.DEVNULL, stdout=etcd_log, stderr=subprocess.STDOUT
            )
        with self.apiserver_log.open("wb") as apiserver_log:
            self.apiserver = subprocess.Popen(
                apiserver_args,
                stdin=subprocess.DEVNULL,
                stdout=apiserver_log,
                stderr=subprocess.STDOUT,
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        insecure = ssl.create_default_context()
        # The probe need not verify the serving certificate; the clients do, with the CA.
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        request = urllib.request.Request(
            f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        last = "no answer"
        while True:
            for name, process in (("etcd", self.etcd), ("kube-apiserver", self.apiserver)):
                if process is None or process.poll() is not None:
                    code = None if process is None else process.returncode
                    raise ControlPlaneError(f"{name} exited with {code}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(request, timeout=2, context=insecure) as response:
                    if response.status == 200 and self.ca_file.exists():
                        return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read().decode(errors='replace')[-500:]}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"kube-apiserver at {self.server} was not ready after "
                    f"{READY_TIMEOUT_SECONDS:.0f} s (last: {last})\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def api_client(self) -> client.ApiClient:
        """A client authenticated as the cluster admin (group system:masters)."""
        return client_from_kubeconfig(self.admin_kubeconfig)

    def create_namespace(self, name: str) -> None:
        """Create a namespace and its `default` ServiceAccount, which pods need to be admitted."""
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
            core.create_namespaced_service_account(
                name, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default"))
            )

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """Write a kubeconfig at `path` that authenticates as the ServiceAccount (1 h token)."""
        with self.api_client() as api:
            request = client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[AUDIENCE], expiration_seconds=3600)
            )
            response = client.CoreV1Api(api).create_namespaced_service_account_token(
                name, namespace, request
            )
        token = response.status.token if response.status else None
        if not token:
            raise ControlPlaneError(f"no token for ServiceAccount {namespace}/{name}")
        user = f"system:serviceaccount:{namespace}:{name}"
        path.write_text(_kubeconfig(self.server, self.ca_file, user, token, namespace))
        return path

    def apply_crds(self, directory: Path = CRD_DIR) -> list[str]:
        """Create or update the CRDs in directory/*.yaml; return their names once served."""
        names = []
        with self.api_client() as api:
            extensions = client.ApiextensionsV1Api(api)
            for path in sorted(directory.glob("*.yaml")):
                body = yaml.safe_load(path.read_text())
                name: str = body["metadata"]["name"]
                try:
                    current = extensions.read_custom_resource_definition(name)
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    extensions.create_custom_resource_definition(body)
                else:
                    assert current.metadata is not None
                    body["metadata"]["resourceVersion"] = current.metadata.resource_version
                    extensions.replace_custom_resource_definition(name, body)
                names.append(name)
            for name in names:
                self._wait_established(api, name)
        return names

    def _wait_established(self, api: client.ApiClient, name: str) -> None:
        extensions = client.ApiextensionsV1Api(api)
        deadline = time.monotonic() + CRD_TIMEOUT_SECONDS
        while True:
            crd = extensions.read_custom_resource_definition(name)
            conditions = (crd.status.conditions if crd.status else None) or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                spec = crd.spec
                version = next(v.name for v in spec.versions if v.storage)
                try:
                    # Established can come a moment before the resource is served.
                    client.CustomObjectsApi(api).list_cluster_custom_object(
                        spec.group, version, spec.names.plural, limit=1
                    )
                    return
                except ApiException as exc:
                    if exc.status != 404:
                        raise
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"CRD {name} not served after {CRD_TIMEOUT_SECONDS:.0f} s: {conditions}"
                )
            time.sleep(0.1)
