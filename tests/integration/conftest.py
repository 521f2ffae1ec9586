"""Fixtures for the operator's integration tests: CRDs installed in devcluster, the operator as a subprocess.

One operator per test module, watching all namespaces (modules run one after another, so two never compete);
a module changes the operator's settings by overriding the `operator_env` fixture.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from kubernetes import client

from devcluster.testing import polling
from devcluster.testing.crds import install_crds
from devcluster.testing.processes import stop_process

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
GROUP, VERSION = "deepseek.ai", "v1alpha1"

# Where the operator keeps private signing keys (in a cluster: its pod's namespace); it creates it when missing.
KEY_NAMESPACE = "deepseek-operator-keys"

# Short intervals so the suite is quick; production defaults are minutes.
FAST_OPERATOR_ENV = {
    "DEEPSEEK_OPERATOR_SIGNING_KEY_NAMESPACE": KEY_NAMESPACE,
    "DEEPSEEK_OPERATOR_DRIFT_CHECK_INTERVAL": "1s",
    "DEEPSEEK_OPERATOR_ISSUER_CHECK_INTERVAL": "2s",
    "DEEPSEEK_OPERATOR_RETRY_INTERVAL": "1s",
}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120,
             interval: float = 0.1) -> Any:
    return polling.wait_for(what, check, timeout, interval)


@pytest.fixture(scope="session")
def crds(cluster, kubeconfig) -> None:
    """Both CRDs applied with kubectl (as the chart and a user would), their kinds served."""
    install_crds(kubeconfig)


class OperatorProcess:
    """`python -m deepseek_operator --all-namespaces` against devcluster, with its log kept in a file."""

    def __init__(self, kubeconfig: str, env: dict[str, str]) -> None:
        self.kubeconfig = kubeconfig
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="deepseek-operator-", suffix=".log")[1])
        self.starts = 0

    def start(self, failpoint: str | None = None) -> None:
        """Start it; with `failpoint` it SIGKILLs itself when a reconcile reaches that step."""
        assert self.proc is None or self.proc.poll() is not None, "operator already running"
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, **self.env}
        env.pop("DEEPSEEK_OPERATOR_FAILPOINT", None)
        if failpoint:
            env["DEEPSEEK_OPERATOR_FAILPOINT"] = failpoint
        log = self.log_path.open("ab")
        log.write(f"---- start {self.starts} failpoint={failpoint}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deepseek_operator", "--all-namespaces", "--liveness", "none",
             "--log-format", "plain"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        log.close()
        self.starts += 1

    def stop(self) -> None:
        """Graceful stop (SIGTERM)."""
        stop_process(self.proc)

    def kill(self) -> None:
        """SIGKILL: no cleanup, exactly like an OOM kill or a node loss."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def wait_exit(self, timeout: float = 120) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return dict(FAST_OPERATOR_ENV)


@pytest.fixture(scope="module")
def operator_class() -> type[OperatorProcess]:
    """What runs the operator; a module overrides it to run a subclass (e.g. one that reads its probes)."""
    return OperatorProcess


@pytest.fixture(scope="module")
def operator(crds, kubeconfig, operator_env, operator_class) -> Iterator[OperatorProcess]:
    process = operator_class(kubeconfig, operator_env)
    process.start()
    yield process
    crashed = not process.running
    process.stop()
    text = process.log_text()
    assert not crashed, f"the operator died during the tests; its log ends:\n{text[-3000:]}"
    # The token itself must never reach the logs.
    assert "eyJ" not in text, "a JWT appeared in the operator log"


def read_auth_documents(configmap: client.V1ConfigMap) -> dict[str, Any]:
    """The four documents of an auth ConfigMap, read per docs/auth-contract.md (either form)."""
    documents: dict[str, Any] = {}
    for name in ("config", "jwks", "revoked", "limits"):
        if configmap.data and f"{name}.json" in configmap.data:
            documents[name] = json.loads(configmap.data[f"{name}.json"])
        elif configmap.binary_data and f"{name}.json.gz" in configmap.binary_data:
            documents[name] = json.loads(gzip.decompress(base64.b64decode(configmap.binary_data[f"{name}.json.gz"])))
    return documents


class Cluster:
    """What the tests do to and read from the API server, in one namespace."""

    wait_for = staticmethod(wait_for)
    key_namespace = KEY_NAMESPACE

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    # -- custom objects
    def apply_deployment(self, name: str = "chat", **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DeepSeekDeployment", "metadata": {"name": name},
                "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "deepseek-server:test",
                         **spec}}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "deepseekdeployments",
                                                           body)

    def create_apikey(self, name: str, deployment: str = "chat", **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": name},
                "spec": {"deploymentRef": {"name": deployment}, "subject": name, "environment": "dev", **spec}}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "apikeys", body)

    def apikey(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "apikeys", name)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_apikey(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, "apikeys", name,
                                                          {"spec": spec})

    def delete_apikey(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, "apikeys", name)

    def deployment(self, name: str = "chat") -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "deepseekdeployments", name)

    # -- children
    def secret(self, name: str) -> client.V1Secret | None:
        try:
            return self.core.read_namespaced_secret(name, self.namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def token(self, apikey: str) -> str | None:
        secret = self.secret(f"{apikey}-apikey")
        if secret is None or not secret.data or "api-key" not in secret.data:
            return None
        return base64.b64decode(secret.data["api-key"]).decode()

    def signing_key_secret(self, deployment: str = "chat") -> client.V1Secret | None:
        """The deployment's private keys: a Secret in the operator's key namespace, named after its uid."""
        from deepseek_operator.names import signing_key_secret_name

        uid = self.deployment(deployment)["metadata"]["uid"]
        try:
            return self.core.read_namespaced_secret(signing_key_secret_name(self.namespace, deployment, uid),
                                                    KEY_NAMESPACE)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def auth(self, deployment: str = "chat") -> dict[str, Any]:
        return read_auth_documents(self.core.read_namespaced_config_map(f"{deployment}-auth", self.namespace))

    def events(self, involved: str) -> list[client.CoreV1Event]:
        items = self.core.list_namespaced_event(self.namespace).items
        return [e for e in items if e.involved_object.name == involved]

    def wait_events(self, involved: str, what: str, check: Callable[[list[str]], bool],
                    timeout: float = 30) -> list[str]:
        """The Event reasons on `involved` once `check` holds for them. The operator records Events after the
        status write they describe, so a test that has just seen the status waits for the Event too."""
        def reasons() -> list[str] | None:
            found = [e.reason for e in self.events(involved)]
            return found if check(found) else None
        return wait_for(f"Events on {self.namespace}/{involved}: {what}", reasons, timeout)

    # -- waiting
    def wait_ready(self, name: str, timeout: float = 120) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            obj = self.apikey(name)
            conditions = (obj or {}).get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) and not \
                    obj["status"].get("pendingToken"):
                return obj
            return None
        return wait_for(f"ApiKey {self.namespace}/{name} Ready", ready, timeout)

    def wait_condition(self, name: str, type_: str, status: str, reason: str | None = None,
                       timeout: float = 120) -> dict[str, Any]:
        def matches() -> dict[str, Any] | None:
            obj = self.apikey(name)
            for c in (obj or {}).get("status", {}).get("conditions", []):
                if c["type"] == type_ and c["status"] == status and (reason is None or c.get("reason") == reason):
                    return obj
            return None
        return wait_for(f"ApiKey {self.namespace}/{name} {type_}={status} ({reason})", matches, timeout)

    def verify(self, token: str, deployment: str = "chat") -> dict[str, Any]:
        """Verify as the server does: EdDSA only, kid looked up in the published JWKS, aud and iss checked."""
        documents = self.auth(deployment)
        kid = jwt.get_unverified_header(token)["kid"]
        keys = {k["kid"]: k for k in documents["jwks"]["keys"]}
        if kid not in keys:
            raise jwt.InvalidKeyError(f"kid {kid} is not in the JWKS")
        key = jwt.PyJWK.from_dict(keys[kid])
        return jwt.decode(token, key.key, algorithms=["EdDSA"], audience=f"{self.namespace}/{deployment}",
                          issuer=f"deepseek-operator/{self.namespace}/{deployment}", leeway=30,
                          options={"require": ["iss", "aud", "sub", "scope", "env", "uid", "jti", "iat", "nbf",
                                              "exp"]})


@pytest.fixture
def runtime(crds, kubeconfig) -> Iterator[Any]:
    """The operator's reconcilers in this process (no kopf, no schedule: each reconcile is the test's call)."""
    from deepseek_operator.kube import KubeApi, load_connection
    from deepseek_operator.runtime import OperatorRuntime
    from deepseek_operator.settings import OperatorSettings

    settings = OperatorSettings(all_namespaces=True, kubeconfig=kubeconfig, signing_key_namespace=KEY_NAMESPACE)
    runtime = OperatorRuntime(settings, KubeApi(load_connection(kubeconfig)))
    runtime.issuers.signing_keys.prepare(create_namespace=True)
    yield runtime
    runtime.close()


@pytest.fixture
def world(api_client, namespace, operator) -> Cluster:
    """A namespace with the operator running."""
    return Cluster(api_client, namespace)


def load_yaml(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)
