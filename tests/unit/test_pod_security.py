"""Every pod the operator builds passes the Pod Security Standards `restricted` profile (pure: the builders)."""

from __future__ import annotations

from typing import Any

import pytest
from deepseek_operator.workloads import build_deployment

# Volume types the restricted profile allows (hostPath is refused by baseline already).
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def _dsd(source: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u", "generation": 1},
            "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat", "revision": "main", "source": source},
                     "image": "registry.example/deepseek-server:1.0", "replicas": 1,
                     "resources": {"gpus": 1}, "server": {"precision": "bf16"}, **spec}}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What the API server's PodSecurity admission (level restricted, latest) would refuse in this pod spec."""
    problems = []
    pod_context = pod.get("securityContext") or {}
    for volume in pod.get("volumes") or []:
        kind = next(k for k in volume if k != "name")
        if kind not in RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']} is {kind}")
    for container in [*(pod.get("initContainers") or []), *pod["containers"]]:
        context = container.get("securityContext") or {}
        name = container["name"]
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation != false")
        caps = context.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            problems.append(f"{name}: hostPort")
    return problems


SOURCES = {
    "pvc": {"pvc": {"claimName": "models"}},
    "huggingFace": {"huggingFace": {}},
}


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("engine", ["builtin", "vllm"])
def test_every_container_passes_the_restricted_profile(source: str, engine: str) -> None:
    extra = {"engine": {"name": "vllm"}} if engine == "vllm" else {}
    pod = build_deployment(_dsd(SOURCES[source], **extra), "blue", "r1", 1)["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    names = {c["name"] for c in [*pod["containers"], *(pod.get("initContainers") or [])]}
    assert ("engine" in names) == (engine == "vllm") and ("fetch-model" in names) == (source == "huggingFace")


@pytest.mark.parametrize("engine", ["builtin", "vllm"])
def test_root_filesystems_are_read_only_with_empty_dirs_where_the_servers_write(engine: str) -> None:
    extra = {"engine": {"name": "vllm"}} if engine == "vllm" else {}
    pod = build_deployment(_dsd({"huggingFace": {}}, **extra), "blue", "r1", 1)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        # Python, torch, Hugging Face and vLLM keep temporary files and caches under /tmp and $HOME.
        assert "emptyDir" in volumes[mounts["/tmp"]]
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        assert env["HOME"] == "/tmp"  # set in every container, so a cache under ~ lands in the emptyDir
        assert (container["securityContext"]["runAsUser"], container["securityContext"]["runAsGroup"]) == (65532,
                                                                                                          65532)
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (65532, 65532)
    if engine == "vllm":
        engine_mounts = {m["mountPath"]: m["name"] for m in pod["containers"][1]["volumeMounts"]}
        assert volumes[engine_mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}


def test_a_host_path_model_keeps_the_pod_otherwise_restricted() -> None:
    pod = build_deployment(_dsd({"hostPath": {"path": "/srv/models/7b"}}), "blue", "r1", 1)["spec"]["template"]["spec"]
    assert restricted_violations(pod) == ["volume model is hostPath"]
