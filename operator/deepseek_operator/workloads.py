"""Pure builders of a DeepSeekDeployment's serving children: the blue/green Deployments, the active and preview
Services, and the server's ServiceAccount, Role and RoleBinding (DESIGN.md, "What the operator makes").

A builtin pod has one container, `server` (deepseek-server with the model inside). A vllm pod has two: `server`, the
deepseek-server gateway (auth, limits, cache, audit, metrics; the only port the Services reach), and `engine`, vLLM's
OpenAI server on the pod's loopback, holding the GPUs.

Every function takes the DeepSeekDeployment object (as the API returns it, defaults applied) and returns plain dicts.
"""

from __future__ import annotations

import math
from typing import Any

from .auth_config import auth_configmap_names
from .engines import VLLM, VLLM_URL, uses_vllm, vllm_args, vllm_env, vllm_image
from .kube import Resource
from .names import SERVER_PORT, auth_configmap_name, deployment_labels, owner_reference, record_key_secret_name

COLORS = ("blue", "green")
COLOR_LABEL = "deepseek.ai/color"
REVISION_LABEL = "deepseek.ai/revision"
# The server's --host: an empty host is every address of both families (asyncio binds 0.0.0.0 and ::), so pods
# answer probes and Services on IPv6 and IPv6-first clusters too; 0.0.0.0 took IPv4 only. Every server version
# reads it so (it is handed to uvicorn as it is).
ALL_ADDRESSES = ""
DEPLOYMENT_LABEL = "deepseek.ai/deployment"
ENGINE_LABEL = "deepseek.ai/engine"
MODEL_MOUNT = "/models"
MODEL_DIR = "/models/model"
# Probe periods: readiness is polled often so a switch waits seconds, not minutes, for a loaded model.
READINESS_PERIOD_SECONDS = 2
STARTUP_PERIOD_SECONDS = 2
# A deleted pod stays in its Services' endpoints until the EndpointSlice controller and every node's proxy have seen
# the deletion; a server that stopped listening at once would reset the connections sent to it meanwhile (scale-downs,
# the capacity handover). Every container first sleeps this long (the kubelet's preStop sleep action, no binary in
# the image needed), then gets SIGTERM and finishes its in-flight requests within SERVER_SHUTDOWN_GRACE_SECONDS (the
# server's --shutdown-grace-s default).
PRE_STOP_SLEEP_SECONDS = 5
SERVER_SHUTDOWN_GRACE_SECONDS = 30
TERMINATION_GRACE_PERIOD_SECONDS = PRE_STOP_SLEEP_SECONDS + SERVER_SHUTDOWN_GRACE_SECONDS

# vLLM's probes run a short Python program in its container (it listens on loopback only, out of the kubelet's
# reach); every few seconds is enough for a start that takes minutes.
ENGINE_STARTUP_PERIOD_SECONDS = 5
ENGINE_PROBE_TIMEOUT_SECONDS = 5
ENGINE_HEALTH_COMMAND = ["python3", "-c", "import urllib.request; "
                         f"urllib.request.urlopen('{VLLM_URL}/health', timeout={ENGINE_PROBE_TIMEOUT_SECONDS - 1})"]

# Pods pass the Pod Security Standards `restricted` profile: a non-root uid (the server image's own user), no
# privilege escalation, no capabilities, the runtime's seccomp profile, and a read-only root filesystem with emptyDirs
# where the processes write: /tmp (also $HOME, so Python, torch, Hugging Face and vLLM caches land there).
POD_UID = 65532
WRITABLE_DIR = "/tmp"
TMP_VOLUME = "tmp"

DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
SERVICES = Resource("", "v1", "services", "Service")
PODS = Resource("", "v1", "pods", "Pod")
SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount")
ROLES = Resource("rbac.authorization.k8s.io", "v1", "roles", "Role")
ROLE_BINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")


def other_color(color: str) -> str:
    return "green" if color == "blue" else "blue"


def color_deployment_name(deployment: str, color: str) -> str:
    return f"{deployment}-{color}"


def active_service_name(deployment: str) -> str:
    return deployment


def preview_service_name(deployment: str) -> str:
    return f"{deployment}-preview"


def server_account_name(deployment: str) -> str:
    return f"{deployment}-server"


def endpoint_url(namespace: str, deployment: str) -> str:
    """The OpenAI-compatible base URL of the active Service inside the cluster."""
    return f"http://{active_service_name(deployment)}.{namespace}.svc:{SERVER_PORT}/v1"


def color_selector(deployment: str, color: str, revision: str | None = None) -> dict[str, str]:
    """Labels that pick the pods of one color (and one revision of it, when given)."""
    selector = {DEPLOYMENT_LABEL: deployment, COLOR_LABEL: color}
    if revision is not None:
        selector[REVISION_LABEL] = revision
    return selector


def label_selector_text(selector: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(selector.items()))


def _metadata(dsd: dict[str, Any], name: str, component: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    owner = dsd["metadata"]["name"]
    return {
        "name": name,
        "namespace": dsd["metadata"]["namespace"],
        "labels": {**deployment_labels(owner), "app.kubernetes.io/component": component, **(extra or {})},
        "ownerReferences": [owner_reference(dsd)],
    }


def server_args(dsd: dict[str, Any], revision: str | None = None) -> list[str]:
    """The `deepseek-server serve` command line (docs/auth-contract.md, "Server settings the operator's pods use").

    With vllm it is the gateway: no model, precision or batch size of its own (those are the engine's, see
    `engines.vllm_args`), the engine's loopback URL instead. The deployment and the pods' `revision` key the
    server's response cache, so a rollout never serves the previous revision's answers.
    """
    spec = dsd["spec"]
    server = spec.get("server") or {}
    namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
    if uses_vllm(spec):
        args = [
            "serve",
            "--engine", VLLM,
            "--engine-url", VLLM_URL,
            "--model-name", spec["model"]["name"],
            "--host", ALL_ADDRESSES,
            "--port", str(SERVER_PORT),
            "--auth-configmap", f"{namespace}/{auth_configmap_name(name)}",
            "--max-new-tokens", str(server.get("maxNewTokens", 512)),
        ]
    else:
        args = [
            "serve",
            "--model", MODEL_DIR,
            "--model-name", spec["model"]["name"],
            "--host", ALL_ADDRESSES,
            "--port", str(SERVER_PORT),
            "--precision", str(server.get("precision", "bf16")),
            "--auth-configmap", f"{namespace}/{auth_configmap_name(name)}",
            "--max-batch-size", str(server.get("maxBatchSize", 8)),
            "--max-new-tokens", str(server.get("maxNewTokens", 512)),
        ]
        if server.get("maxModelLen"):
            args += ["--max-model-len", str(server["maxModelLen"])]
        cpu = (spec.get("resources") or {}).get("cpu")
        if cpu is not None:
            # torch's threads: the replica's CPUs, not the node's (a pod sees every core of its node)
            args += ["--torch-threads", str(cpu_threads(cpu))]
    cache = server.get("cache") or {}
    if cache.get("enabled", True):
        args += ["--cache-ttl", str(cache.get("ttlSeconds", 300))]
    else:
        args.append("--no-cache")
    args += ["--deployment", f"{namespace}/{name}"]
    if revision is not None:
        args += ["--model-revision", revision]
    redis = spec.get("redis") or {}
    if redis.get("url"):
        args += ["--redis-url", str(redis["url"])]
    if server.get("shutdownGraceSeconds") is not None:  # left out: the server's own default, the same 30 s
        args += ["--shutdown-grace-s", str(int(server["shutdownGraceSeconds"]))]
    return args


_DECIMAL_SUFFIXES = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SUFFIXES = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}


def quantity_value(quantity: int | float | str) -> float:
    """A Kubernetes quantity as a number: `500m` -> 0.5, `2` -> 2, `1.5` -> 1.5, `1Ki` -> 1024, `2e3` -> 2000."""
    text = str(quantity).strip()
    for suffix, power in _BINARY_SUFFIXES.items():
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * 2 ** power
    if text[-1:] in _DECIMAL_SUFFIXES:
        return float(text[:-1]) * 10 ** _DECIMAL_SUFFIXES[text[-1]]
    return float(text)  # plain, or with an exponent (`2e3`)


# More torch threads than any node has CPUs only adds switching; the cap also keeps a quantity the schema lets
# through (`1e400` is a number to its pattern, and infinite to Python) from breaking the pod's command line.
MAX_TORCH_THREADS = 1024


def cpu_threads(cpu: int | float | str) -> int:
    """The builtin engine's torch threads for a replica that requests `cpu`: that many CPUs, rounded up, at least 1
    (a CPU quantity of `1500m` keeps two threads busy part of the time rather than one all of it), at most
    `MAX_TORCH_THREADS`."""
    value = quantity_value(cpu)
    if not value < MAX_TORCH_THREADS:  # also infinity
        return MAX_TORCH_THREADS
    return max(1, math.ceil(value - 1e-9))


def shutdown_grace(spec: dict[str, Any]) -> int:
    """Seconds a server (and a vLLM engine) may finish in-flight requests after SIGTERM."""
    grace = (spec.get("server") or {}).get("shutdownGraceSeconds")
    return int(SERVER_SHUTDOWN_GRACE_SECONDS if grace is None else grace)


def termination_grace_period(spec: dict[str, Any]) -> int:
    """Seconds the kubelet gives a server pod to stop: the preStop wait, then the server's shutdown grace."""
    return PRE_STOP_SLEEP_SECONDS + shutdown_grace(spec)


RECORD_KEY_ENTRY = "record-key"


def build_record_key_secret(dsd: dict[str, Any], key: str) -> dict[str, Any]:
    """The Secret with the deployment's record key (`key`: random, at least 32 characters, made by the caller)."""
    name = dsd["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _metadata(dsd, record_key_secret_name(name), "record-key"),
            "stringData": {RECORD_KEY_ENTRY: key}}


def record_key_env(deployment: str) -> dict[str, Any]:
    """The server reads its record key from the environment (never from its command line, which `ps` shows)."""
    return {"name": "DEEPSEEK_RECORD_KEY",
            "valueFrom": {"secretKeyRef": {"name": record_key_secret_name(deployment), "key": RECORD_KEY_ENTRY}}}


def _server_env(spec: dict[str, Any]) -> list[dict[str, Any]]:
    redis = spec.get("redis") or {}
    env: list[dict[str, Any]] = []
    if redis.get("secretRef"):
        ref = redis["secretRef"]
        env.append({"name": "DEEPSEEK_REDIS_URL",
                    "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref.get("key", "url")}}})
    return env


def _model_volumes(spec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes, the server's mounts, and init containers that bring the weights to MODEL_DIR."""
    source = spec["model"].get("source") or {}
    if "hostPath" in source:
        return ([{"name": "model", "hostPath": {"path": source["hostPath"]["path"], "type": "Directory"}}],
                [{"name": "model", "mountPath": MODEL_DIR, "readOnly": True}], [])
    if "pvc" in source:
        mount: dict[str, Any] = {"name": "model", "mountPath": MODEL_DIR, "readOnly": True}
        if source["pvc"].get("subPath"):
            mount["subPath"] = source["pvc"]["subPath"]
        return ([{"name": "model", "persistentVolumeClaim": {"claimName": source["pvc"]["claimName"],
                                                             "readOnly": True}}], [mount], [])
    if "huggingFace" in source or not source:
        # The server loads from a directory; an init container of the same image downloads the revision first
        # (anonymously when no token Secret is named).
        ref = (source.get("huggingFace") or {}).get("tokenSecretRef")
        # The server images set HF_HUB_OFFLINE=1 (the server never downloads); this container exists to download.
        env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": f"{MODEL_MOUNT}/hf-home"},
                                     {"name": "HF_HUB_OFFLINE", "value": "0"}]
        if ref:
            env.append({"name": "HF_TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref.get("key", "token")}}})
        init = {
            "name": "fetch-model",
            "image": spec["image"],
            "command": ["hf", "download", spec["model"]["name"],
                        "--revision", str(spec["model"].get("revision", "main")), "--local-dir", MODEL_DIR],
            "env": env,
            "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT}],
            **LOG_AS_TERMINATION_MESSAGE,
        }
        return ([{"name": "model", "emptyDir": {}}], [{"name": "model", "mountPath": MODEL_MOUNT}], [init])
    raise ValueError(f"model.source {sorted(source)} is not one of pvc, hostPath, huggingFace")


def _resources(spec: dict[str, Any]) -> dict[str, Any]:
    resources = spec.get("resources") or {}
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    gpus = int(resources.get("gpus", 1))
    if gpus > 0:
        name = resources.get("gpuResourceName", "nvidia.com/gpu")
        requests[name] = str(gpus)
        limits[name] = str(gpus)
    if resources.get("memory") is not None:
        requests["memory"] = str(resources["memory"])
        limits["memory"] = str(resources["memory"])
    if resources.get("cpu") is not None:
        requests["cpu"] = str(resources["cpu"])  # no CPU limit: throttling a model server only adds latency
    built: dict[str, Any] = {}
    if requests:
        built["requests"] = requests
    if limits:
        built["limits"] = limits
    return built


# A container that exits with an error and wrote no termination message gets the end of its log as the message
# (the kubelet keeps 80 lines, 2 KiB): a server whose model cannot be loaded says why in the pod's status, which
# the rollout's reason for rolling back repeats.
LOG_AS_TERMINATION_MESSAGE = {"terminationMessagePolicy": "FallbackToLogsOnError"}


def _pre_stop() -> dict[str, Any]:
    """The preStop hook of every long-running container (see PRE_STOP_SLEEP_SECONDS)."""
    return {"preStop": {"sleep": {"seconds": PRE_STOP_SLEEP_SECONDS}}}


def _probes(spec: dict[str, Any]) -> dict[str, Any]:
    deadline = int((spec.get("rollout") or {}).get("progressDeadlineSeconds", 1800))
    http = {"port": "http"}
    return {
        # Model loading may take most of the progress deadline; liveness only starts after the process answers.
        "startupProbe": {"httpGet": {**http, "path": "/health"}, "periodSeconds": STARTUP_PERIOD_SECONDS,
                         "failureThreshold": max(3, math.ceil(deadline / STARTUP_PERIOD_SECONDS)),
                         "timeoutSeconds": 2},
        "livenessProbe": {"httpGet": {**http, "path": "/health"}, "periodSeconds": 10, "failureThreshold": 3,
                          "timeoutSeconds": 5},
        "readinessProbe": {"httpGet": {**http, "path": "/ready"}, "periodSeconds": READINESS_PERIOD_SECONDS,
                           "failureThreshold": 2, "successThreshold": 1, "timeoutSeconds": 2},
    }


def _engine_probes(spec: dict[str, Any]) -> dict[str, Any]:
    """vLLM's /health from inside its container: the start may take most of the progress deadline (weights, CUDA
    graphs, the KV cache), then a hung engine is restarted. Readiness is the gateway's (/ready asks the engine)."""
    deadline = int((spec.get("rollout") or {}).get("progressDeadlineSeconds", 1800))
    check = {"exec": {"command": ENGINE_HEALTH_COMMAND}, "timeoutSeconds": ENGINE_PROBE_TIMEOUT_SECONDS}
    return {
        "startupProbe": {**check, "periodSeconds": ENGINE_STARTUP_PERIOD_SECONDS,
                         "failureThreshold": max(3, math.ceil(deadline / ENGINE_STARTUP_PERIOD_SECONDS))},
        "livenessProbe": {**check, "periodSeconds": 10, "failureThreshold": 3},
    }


def build_engine_container(spec: dict[str, Any], mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """The `engine` container of a vllm pod: the official image's `vllm serve` on loopback, with the GPUs."""
    return {
        "name": "engine",
        "image": vllm_image(spec),
        "args": vllm_args(spec, MODEL_DIR, shutdown_grace_s=shutdown_grace(spec)),
        "env": vllm_env(spec),
        "resources": _resources(spec),
        # Tensor-parallel workers exchange tensors through shared memory; a container's own /dev/shm is 64 MiB.
        "volumeMounts": [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}],
        **_engine_probes(spec),
        # not stopped before the gateway in front of it has left the endpoints
        "lifecycle": _pre_stop(),
        **LOG_AS_TERMINATION_MESSAGE,
    }


def container_security_context() -> dict[str, Any]:
    """The `restricted` profile for one container, with a read-only root filesystem."""
    return {"runAsNonRoot": True, "runAsUser": POD_UID, "runAsGroup": POD_UID, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
            "seccompProfile": {"type": "RuntimeDefault"}}


def restrict_pod_spec(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """`pod_spec` with the restricted security context on the pod and on every container (init containers too),
    and a writable emptyDir at /tmp, also $HOME unless a container sets its own, in each of them."""
    restricted = dict(pod_spec)
    restricted["securityContext"] = {"runAsNonRoot": True, "runAsUser": POD_UID, "runAsGroup": POD_UID,
                                     "fsGroup": POD_UID, "seccompProfile": {"type": "RuntimeDefault"}}
    volumes = list(pod_spec.get("volumes") or [])
    if not any(v["name"] == TMP_VOLUME for v in volumes):
        volumes.append({"name": TMP_VOLUME, "emptyDir": {}})
    restricted["volumes"] = volumes
    for key in ("initContainers", "containers"):
        if key not in pod_spec:
            continue
        containers = []
        for original in pod_spec[key]:
            container = {**original, "securityContext": container_security_context()}
            mounts = list(original.get("volumeMounts") or [])
            if not any(m["mountPath"] == WRITABLE_DIR for m in mounts):
                mounts.append({"name": TMP_VOLUME, "mountPath": WRITABLE_DIR})
            container["volumeMounts"] = mounts
            env = list(original.get("env") or [])
            if not any(e["name"] == "HOME" for e in env):
                env.append({"name": "HOME", "value": WRITABLE_DIR})
            container["env"] = env
            containers.append(container)
        restricted[key] = containers
    return restricted


def build_deployment(dsd: dict[str, Any], color: str, revision: str, replicas: int) -> dict[str, Any]:
    """The `X-<color>` Deployment running `revision`; `Recreate` so a template change never needs a spare GPU."""
    spec = dsd["spec"]
    name = dsd["metadata"]["name"]
    labels = color_selector(name, color, revision)
    vllm = uses_vllm(spec)
    pod_labels = {**deployment_labels(name), "app.kubernetes.io/component": "server", **labels}
    if vllm:
        pod_labels[ENGINE_LABEL] = VLLM  # the chart's ServiceMonitor scrapes /metrics/engine of these pods only
    volumes, mounts, init_containers = _model_volumes(spec)
    container: dict[str, Any] = {
        "name": "server",
        "image": spec["image"],
        "args": server_args(dsd, revision),
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "env": [*_server_env(spec), record_key_env(name)],
        # With vllm the engine container holds the GPUs, memory and CPU; the gateway needs little of either.
        "resources": {} if vllm else _resources(spec),
        "volumeMounts": [] if vllm else mounts,
        **_probes(spec),
        "lifecycle": _pre_stop(),  # keeps serving until the Services' endpoints no longer lead here
        **LOG_AS_TERMINATION_MESSAGE,
    }
    containers = [container]
    if vllm:
        containers.append(build_engine_container(spec, mounts))
        volumes = [*volumes, {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    scheduling = spec.get("scheduling") or {}
    pod_spec: dict[str, Any] = {
        "serviceAccountName": server_account_name(name),
        "automountServiceAccountToken": True,  # the server watches its auth ConfigMap through the API
        # No variables for the namespace's Services: a Service named `vllm` (a deployment's own, once it serves)
        # becomes VLLM_PORT=tcp://..., which vLLM reads as its own setting and refuses, and the engine never starts
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_period(spec),
        "containers": containers,
        "volumes": volumes,
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if scheduling.get(key):
            pod_spec[key] = scheduling[key]
    # Last, so that every container built above (server, engine, fetch-model) gets it.
    pod_spec = restrict_pod_spec(pod_spec)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(dsd, color_deployment_name(name, color), "server", labels),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": color_selector(name, color)},
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 2,
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": _pod_annotations(spec),
                },
                "spec": pod_spec,
            },
        },
    }


def _pod_annotations(spec: dict[str, Any]) -> dict[str, str]:
    annotations = {"deepseek.ai/model": spec["model"]["name"],
                   "deepseek.ai/model-revision": str(spec["model"].get("revision", "main"))}
    if uses_vllm(spec):
        # `kubectl logs POD` shows the gateway (requests, auth) unless `-c engine` asks for vLLM's log.
        annotations["kubectl.kubernetes.io/default-container"] = "server"
    return annotations


def _service(dsd: dict[str, Any], name: str, component: str, selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(dsd, name, component),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            # Only ready pods: traffic never reaches a server still loading its model.
            "publishNotReadyAddresses": False,
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_active_service(dsd: dict[str, Any], color: str, revision: str) -> dict[str, Any]:
    """The `X` Service: the pods of the active color running the active revision."""
    name = dsd["metadata"]["name"]
    return _service(dsd, active_service_name(name), "active", color_selector(name, color, revision))


def build_preview_service(dsd: dict[str, Any], color: str, revision: str) -> dict[str, Any]:
    """The `X-preview` Service: the ready pods of the revision being rolled out."""
    name = dsd["metadata"]["name"]
    return _service(dsd, preview_service_name(name), "preview", color_selector(name, color, revision))


def build_server_account(dsd: dict[str, Any]) -> list[dict[str, Any]]:
    """ServiceAccount, Role (get/watch on the deployment's own auth ConfigMaps only: the index and its shards) and
    RoleBinding of the server."""
    name = dsd["metadata"]["name"]
    account = server_account_name(name)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(dsd, account, "server")},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(dsd, account, "server"),
            "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                       "resourceNames": auth_configmap_names(name), "verbs": ["get", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(dsd, account, "server"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": dsd["metadata"]["namespace"]}],
        },
    ]
