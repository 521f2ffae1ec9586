"""Whatever the DeepSeekDeployment schema accepts, the operator can serve: random specs near a full valid one are
sent to the API server (server-side dry run); for each one it accepts, the operator's builders make its children
without an exception, the API server accepts every child (dry run again), and the server parses the command line
the operator gives its pods. A spec that would only fail there (a toleration the API server refuses, a port out of
range, a context length the server refuses) is an error at `kubectl apply` instead, not a rollout that fails later.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
from deepseek_operator import autoscaler, engines, revision, verification, workloads
from kubernetes import client, utils

pytestmark = pytest.mark.cluster

server_cli = pytest.importorskip("deepseek_server.__main__")
server_settings = pytest.importorskip("deepseek_server.settings")

GROUP, VERSION = "deepseek.ai", "v1alpha1"
SPECS = 1200
SEED = 20261205

FULL = {
    "model": {"name": "deepseek-ai/deepseek-llm-7b-chat", "revision": "main",
              "source": {"pvc": {"claimName": "weights", "subPath": "models/chat"}}},
    "image": "deepseek-server:1",
    "engine": {"name": "builtin"},
    "replicas": 2,
    "autoscaling": {"enabled": False, "minReplicas": 1, "maxReplicas": 3},
    "resources": {"gpus": 1, "gpuResourceName": "nvidia.com/gpu", "memory": "40Gi", "cpu": "8"},
    "scheduling": {"nodeSelector": {"pool": "gpu", "example.com/zone": "a"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                   {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
                                    "tolerationSeconds": 60}],
                   "priorityClassName": "inference"},
    "server": {"precision": "bf16", "maxBatchSize": 8, "maxModelLen": 4096, "maxNewTokens": 256,
               "shutdownGraceSeconds": 30, "cache": {"enabled": True, "ttlSeconds": 60}},
    "redis": {"url": "redis://redis:6379/0"},
    "auth": {"defaultScopes": ["model:predict"]},
    "rateLimit": {"requestsPerSecond": 5, "burst": 10, "tokensPerMinute": 1000, "maxParallelRequests": 4},
    "rollout": {"strategy": "BlueGreen", "autoPromote": True, "previewReplicas": 1, "progressDeadlineSeconds": 600,
                "analysis": {"smokePrompt": "hi", "requests": 3, "maxErrorRate": 0.1, "maxLatencyMs": 1000,
                             "windowSeconds": 60},
                "scaleDownDelaySeconds": 10, "revisionHistoryLimit": 3},
}

VLLM = {"name": "vllm", "image": "vllm/vllm-openai:v0.32.0", "prefixCaching": True,
        "extraArgs": ["--gpu-memory-utilization", "0.85"], "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "INFO"}]}

# Whole blocks swapped in before the leaves are changed, so that every part of the schema gets exercised.
BLOCKS: dict[tuple[str, ...], list[Any]] = {
    ("model", "source"): [{"hostPath": {"path": "/models/chat"}},
                          {"huggingFace": {"tokenSecretRef": {"name": "hf-token", "key": "token"}}},
                          {"pvc": {"claimName": "w"}}],
    ("redis",): [{"secretRef": {"name": "redis-url", "key": "url"}}, {"url": "rediss://[::1]:6380/1"}],
    ("autoscaling",): [{"enabled": True, "minReplicas": 1, "maxReplicas": 5, "metric": "QueueDepth",
                        "targetPerReplica": 2, "scaleUp": {"stabilizationWindowSeconds": 0},
                        "scaleDown": {"stabilizationWindowSeconds": 10}}],
    ("scheduling", "affinity"): [
        {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "gpu.example.com/model", "operator": "In", "values": ["h100", "h200"]},
                                      {"key": "spot", "operator": "DoesNotExist"}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "preference": {"matchExpressions": [
                    {"key": "gpu.example.com/memory", "operator": "Gt", "values": ["80"]}]}}]}},
        {"podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "chat"},
                                      "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["batch"]}]},
                    "matchLabelKeys": ["pod-template-hash"]}}],
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "topology.kubernetes.io/zone", "namespaces": ["team-a"],
                 "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
                 "labelSelector": {"matchLabels": {"role": "trainer"}}, "mismatchLabelKeys": ["owner"]}]},
         "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
             {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"cache": "warm"}}}]}},
    ],
}

# Values a user could type into any field: boundaries, wrong kinds, and the strings the API server is strict about.
STRINGS = ["", " ", "a", "A b", "x" * 63, "x" * 64, "x" * 254, "nvidia.com/gpu", "gpu", "cpu", "a/b/c", "a/", "/a",
           "p" * 253 + "/k", "p" * 254 + "/k",
           "-a", "a-", "a_b", "é", "a\nb", "--model", "--port=1", "0", "-5", "1e400", "1e3", ".5", "5E", "1.",
           "100Mi", "1Ei", "redis://", "redis://r:99999", "redis://:pw@r:6379", "rediss://h:1/2", "http://x",
           "/", "/models", "../x", "a/../b", "main", "v1.2/x", "Exists", "Equal", "In", "NotIn", "Gt", "DoesNotExist",
           "NoExecute", "NoSchedule", "metadata.name", "kubernetes.io/hostname", "Example.com/X", "a" * 1024]
INTEGERS = [0, 1, -1, 2, 3, 7, 15, 16, 17, 64, 100, 101, 1000, 1001, 3600, 86400, 604800, 2**31, 2**53, 2**63 - 1]
NUMBERS = [0.0, 0.5, 1.5, 1e-9, 100000.5, 1e9]


def random_value(rng: random.Random, like: Any) -> Any:
    """A value of the same kind as `like` most of the time, of another kind or absent (None) some of the time."""
    roll = rng.random()
    if roll < 0.1:
        return None
    if roll < 0.15:
        return rng.choice([*STRINGS, *INTEGERS, *NUMBERS, True, [], {}])
    if isinstance(like, bool):
        return rng.choice([True, False])
    if isinstance(like, int):
        return rng.choice(INTEGERS)
    if isinstance(like, float):
        return rng.choice(NUMBERS + INTEGERS)
    if isinstance(like, str):
        return rng.choice(STRINGS)
    if isinstance(like, list):
        return [random_value(rng, like[0] if like else "x") for _ in range(rng.choice([0, 1, 2]))]
    if isinstance(like, dict):
        return {rng.choice(STRINGS): rng.choice(STRINGS) for _ in range(rng.choice([0, 1, 2]))}
    return None


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


def _set(node: Any, path: tuple[Any, ...], value: Any) -> None:
    parent = _get(node, path[:-1])
    if value is None and isinstance(parent, dict):
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value


def random_spec(rng: random.Random) -> dict[str, Any]:
    """The full spec, maybe with vllm and other blocks, then one to three leaves or subtrees replaced."""
    spec = copy.deepcopy(FULL)
    if rng.random() < 0.4:
        spec["engine"] = copy.deepcopy(VLLM)
        spec["server"]["precision"] = rng.choice(["bf16", "fp16", "fp8"])
    for path, blocks in BLOCKS.items():
        if rng.random() < 0.3:
            _get(spec, path[:-1])[path[-1]] = copy.deepcopy(rng.choice(blocks))
    for _ in range(rng.choice([1, 1, 2, 3])):
        path = rng.choice(list(_paths(spec)))
        _set(spec, path, random_value(rng, _get(spec, path)))
    return spec


def parse_server_args(args: list[str]) -> Any:
    parser = argparse.ArgumentParser(exit_on_error=False)
    server_cli._serve_parser(parser.add_subparsers(dest="command"))
    options = {key: value for key, value in vars(parser.parse_args(args)).items() if key != "command"}
    return server_settings.ServerSettings(**options)


def children(dsd: dict[str, Any]) -> list[dict[str, Any]]:
    """What the operator builds for a deployment (both colors, both Services, the server's account) and what it
    derives from its spec along the way."""
    spec = dsd["spec"]
    rev = revision.compute_revision(spec)
    verification.AnalysisSettings.from_spec(spec)
    autoscaler.AutoscalingSettings.from_spec(spec)
    replicas = autoscaler.effective_replicas(spec, {})
    if engines.uses_vllm(spec):
        engines.vllm_args(spec, "/models/model")
    built = [workloads.build_deployment(dsd, color, rev, replicas) for color in ("blue", "green")]
    built += [workloads.build_active_service(dsd, "blue", rev), workloads.build_preview_service(dsd, "green", rev)]
    return built + workloads.build_server_account(dsd)


def dry_run_create(api_client: client.ApiClient, namespace: str, obj: dict[str, Any]) -> None:
    """The API server's answer to creating `obj` (without its owner, whose uid a dry run does not store)."""
    obj = {**obj, "metadata": {key: value for key, value in obj["metadata"].items() if key != "ownerReferences"}}
    try:
        utils.create_from_dict(api_client, obj, namespace=namespace, dry_run="All")
    except utils.FailToCreateError as failed:
        raise failed.api_exceptions[0] from None


def test_every_spec_the_schema_accepts_gives_children_the_api_server_accepts(crds, api_client, namespace):
    custom = client.CustomObjectsApi(api_client)
    rng = random.Random(SEED)
    accepted, problems = 0, []
    for _ in range(SPECS):
        spec = random_spec(rng)
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DeepSeekDeployment", "metadata": {"name": "chat"},
                "spec": spec}
        try:
            dsd = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "deepseekdeployments", body,
                                                         dry_run="All")
        except client.ApiException as exc:
            assert exc.status == 422, (exc.status, exc.body)  # refused as invalid, never a server error
            continue
        accepted += 1
        dsd["metadata"].update(namespace=namespace, uid=dsd["metadata"].get("uid") or "00000000-0000-0000-0000-0")
        shown = json.dumps(spec)[:2000]
        try:
            built = children(dsd)
            parse_server_args(next(c for c in built[0]["spec"]["template"]["spec"]["containers"]
                                   if c["name"] == "server")["args"])
        except Exception as exc:
            problems.append(f"{type(exc).__name__}: {exc}\n  spec: {shown}")
            continue
        for obj in built:
            try:
                dry_run_create(api_client, namespace, json.loads(json.dumps(obj)))
            except client.ApiException as exc:
                message = json.loads(exc.body).get("message", "") if exc.body else str(exc)
                problems.append(f"{obj['kind']} refused ({exc.status}): {message[:600]}\n  spec: {shown}")
                break
    # The generator must keep reaching specs the schema accepts, or the test proves nothing.
    assert accepted >= SPECS // 5, f"only {accepted} of {SPECS} random specs were accepted"
    assert not problems, f"{len(problems)} of {accepted} accepted specs failed:\n" + "\n".join(problems[:15])
