"""Pure builders of a DeepSeekDeployment's serving children: the blue/green Deployments, the active and preview
Services, and the server's ServiceAccount, Role and RoleBinding (DESIGN.md, "What the operator makes").

Every function takes the DeepSeekDeployment object (as the API returns it, defaults applied) and returns plain dicts.
"""

from __future__ import annotations

import math
from typing import Any

from .kube import Resource
from .names import SERVER_PORT, auth_configmap_name, deployment_labels, owner_reference

COLORS = ("blue", "green")
COLOR_LABEL = "deepseek.ai/color"
REVISION_LABEL = "deepseek.ai/revision"
DEPLOYMENT_LABEL = "deepseek.ai/deployment"
MODEL_MOUNT = "/models"
MODEL_DIR = "/models/model"
# Probe periods: readiness is polled often so a switch waits seconds, not minutes, for a loaded model.
READINESS_PERIOD_SECONDS = 2
STARTUP_PERIOD_SECONDS = 2

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


def server_args(dsd: dict[str, Any]) -> list[str]:
    """The `deepseek-server serve` command line (docs/auth-contract.md, "Server settings the operator's pods use")."""
    spec = dsd["spec"]
    server = spec.get("server") or {}
    namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
    args = [
        "serve",
        "--model", MODEL_DIR,
        "--model-name", spec["model"]["name"],
        "--host", "0.0.0.0",
        "--port", str(SERVER_PORT),
        "--precision", str(server.get("precision", "bf16")),
        "--auth-configmap", f"{namespace}/{auth_configmap_name(name)}",
        "--max-batch-size", str(server.get("maxBatchSize", 8)),
        "--max-new-tokens", str(server.get("maxNewTokens", 512)),
    ]
    if server.get("maxModelLen"):
        args += ["--max-model-len", str(server["maxModelLen"])]
    cache = server.get("cache") or {}
    if cache.get("enabled", True):
        args += ["--cache-ttl", str(cache.get("ttlSeconds", 300))]
    else:
        args.append("--no-cache")
    redis = spec.get("redis") or {}
    if redis.get("url"):
        args += ["--redis-url", str(redis["url"])]
    return args


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
        env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": f"{MODEL_MOUNT}/hf-home"}]
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


def build_deployment(dsd: dict[str, Any], color: str, revision: str, replicas: int) -> dict[str, Any]:
    """The `X-<color>` Deployment running `revision`; `Recreate` so a template change never needs a spare GPU."""
    spec = dsd["spec"]
    name = dsd["metadata"]["name"]
    labels = color_selector(name, color, revision)
    pod_labels = {**deployment_labels(name), "app.kubernetes.io/component": "server", **labels}
    volumes, mounts, init_containers = _model_volumes(spec)
    container: dict[str, Any] = {
        "name": "server",
        "image": spec["image"],
        "args": server_args(dsd),
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "env": _server_env(spec),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        **_probes(spec),
    }
    scheduling = spec.get("scheduling") or {}
    pod_spec: dict[str, Any] = {
        "serviceAccountName": server_account_name(name),
        "automountServiceAccountToken": True,  # the server watches its auth ConfigMap through the API
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": volumes,
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if scheduling.get(key):
            pod_spec[key] = scheduling[key]
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
                    "annotations": {"deepseek.ai/model": spec["model"]["name"],
                                    "deepseek.ai/model-revision": str(spec["model"].get("revision", "main"))},
                },
                "spec": pod_spec,
            },
        },
    }


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
    """ServiceAccount, Role (get/watch on the deployment's own auth ConfigMap only) and RoleBinding of the server."""
    name = dsd["metadata"]["name"]
    account = server_account_name(name)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(dsd, account, "server")},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(dsd, account, "server"),
            "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                       "resourceNames": [auth_configmap_name(name)], "verbs": ["get", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(dsd, account, "server"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": dsd["metadata"]["namespace"]}],
        },
    ]
