"""Pure builders of the serving children, the revision hash, capacity reading and verification judging."""

from __future__ import annotations

import copy
from typing import Any

import jwt
import pytest
from deepseek_operator.capacity import gpu_shortage
from deepseek_operator.key_material import new_signing_key
from deepseek_operator.revision import compute_revision
from deepseek_operator.tokens import sign_token
from deepseek_operator.verification import (
    AnalysisSettings,
    Endpoint,
    Outcome,
    judge,
    parse_request_counts,
    ready_endpoints,
    verification_grant,
)
from deepseek_operator.workloads import (
    build_active_service,
    build_deployment,
    build_preview_service,
    build_server_account,
    endpoint_url,
    server_args,
)


def dsd(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"name": "deepseek-ai/deepseek-llm-7b-chat", "revision": "main",
                  "source": {"hostPath": {"path": "/srv/models/7b"}}},
        "image": "registry.example/deepseek-server:1.0",
        "replicas": 2,
        "resources": {"gpus": 1, "gpuResourceName": "nvidia.com/gpu", "memory": "40Gi", "cpu": "8"},
        "server": {"precision": "bf16", "maxBatchSize": 8, "maxNewTokens": 512, "cache": {"enabled": True,
                                                                                            "ttlSeconds": 300}},
        "rollout": {"progressDeadlineSeconds": 600},
    }
    base.update(spec)
    return {"apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment",
            "metadata": {"name": "chat", "namespace": "team", "uid": "uid-1", "generation": 1}, "spec": base}


# ------------------------------------------------------------------------------------------------ revision
def test_revision_is_stable_and_ignores_non_pod_fields() -> None:
    one = dsd()
    assert compute_revision(one["spec"]) == compute_revision(copy.deepcopy(one["spec"]))
    scaled = dsd(replicas=7, rollout={"autoPromote": False}, rateLimit={"burst": 99}, auth={"defaultScopes": []})
    assert compute_revision(scaled["spec"]) == compute_revision(one["spec"])
    assert len(compute_revision(one["spec"])) == 10


@pytest.mark.parametrize("change", [
    {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat", "revision": "v2",
               "source": {"hostPath": {"path": "/srv/models/7b"}}}},
    {"image": "registry.example/deepseek-server:1.1"},
    {"server": {"precision": "fp16"}},
    {"resources": {"gpus": 2}},
    {"scheduling": {"nodeSelector": {"gpu": "h100"}}},
    {"redis": {"url": "redis://redis:6379/0"}},
])
def test_revision_changes_with_pod_affecting_fields(change: dict[str, Any]) -> None:
    assert compute_revision(dsd(**change)["spec"]) != compute_revision(dsd()["spec"])


def test_revision_treats_empty_and_absent_alike() -> None:
    assert compute_revision({**dsd()["spec"], "scheduling": {}}) == compute_revision(dsd()["spec"])


# ------------------------------------------------------------------------------------------------ deployment
def test_deployment_has_fixed_name_labels_owner_and_gpu_resources() -> None:
    built = build_deployment(dsd(), "green", "abc123", 1)
    meta = built["metadata"]
    assert meta["name"] == "chat-green" and meta["namespace"] == "team"
    assert meta["ownerReferences"][0]["uid"] == "uid-1"
    assert built["spec"]["selector"]["matchLabels"] == {"deepseek.ai/deployment": "chat", "deepseek.ai/color": "green"}
    labels = built["spec"]["template"]["metadata"]["labels"]
    assert labels["deepseek.ai/revision"] == "abc123" and labels["deepseek.ai/color"] == "green"
    assert labels["app.kubernetes.io/instance"] == "chat" and labels["app.kubernetes.io/name"] == "deepseek-server"
    container = built["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"] == {"nvidia.com/gpu": "1", "memory": "40Gi", "cpu": "8"}
    assert "cpu" not in container["resources"]["limits"]
    assert built["spec"]["strategy"] == {"type": "Recreate"}
    assert built["spec"]["replicas"] == 1


def test_deployment_probes_and_startup_budget() -> None:
    container = build_deployment(dsd(), "blue", "r", 1)["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_server_args_follow_the_contract() -> None:
    args = server_args(dsd(redis={"url": "redis://r:6379/0"}, server={"precision": "int8", "maxModelLen": 2048,
                                                                      "cache": {"enabled": False}}))
    joined = " ".join(args)
    assert args[0] == "serve"
    assert "--model /models/model" in joined and "--model-name deepseek-ai/deepseek-llm-7b-chat" in joined
    assert "--auth-configmap team/chat-auth" in joined and "--precision int8" in joined
    assert "--host 0.0.0.0 --port 8000" in joined and "--redis-url redis://r:6379/0" in joined
    assert "--max-model-len 2048" in joined and "--no-cache" in args


def test_model_sources() -> None:
    host = build_deployment(dsd(), "blue", "r", 1)["spec"]["template"]["spec"]
    assert host["volumes"][0]["hostPath"] == {"path": "/srv/models/7b", "type": "Directory"}
    pvc_spec = build_deployment(dsd(model={"name": "m", "source": {"pvc": {"claimName": "weights", "subPath": "7b"}}}),
                                "blue", "r", 1)["spec"]["template"]["spec"]
    assert pvc_spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "weights"
    assert pvc_spec["containers"][0]["volumeMounts"][0]["subPath"] == "7b"
    hub = build_deployment(dsd(model={"name": "deepseek-ai/x", "revision": "v3",
                                      "source": {"huggingFace": {"tokenSecretRef": {"name": "hf"}}}}),
                           "blue", "r", 1)["spec"]["template"]["spec"]
    init = hub["initContainers"][0]
    assert init["command"][:3] == ["hf", "download", "deepseek-ai/x"] and "v3" in init["command"]
    assert init["env"][1]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}


def test_redis_secret_ref_becomes_env() -> None:
    container = build_deployment(dsd(redis={"secretRef": {"name": "redis", "key": "url"}}), "blue", "r", 1)[
        "spec"]["template"]["spec"]["containers"][0]
    assert container["env"] == [{"name": "DEEPSEEK_REDIS_URL",
                                 "valueFrom": {"secretKeyRef": {"name": "redis", "key": "url"}}}]
    assert not any(a.startswith("redis://") for a in container["args"])


def test_scheduling_is_copied() -> None:
    scheduling = {"nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
                  "priorityClassName": "inference"}
    pod = build_deployment(dsd(scheduling=scheduling), "blue", "r", 1)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "inference"
    assert pod["tolerations"] == scheduling["tolerations"]
    assert pod["serviceAccountName"] == "chat-server"


def test_cpu_only_deployment_requests_no_gpu() -> None:
    container = build_deployment(dsd(resources={"gpus": 0}), "blue", "r", 1)["spec"]["template"]["spec"][
        "containers"][0]
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {})


# ------------------------------------------------------------------------------------------------ services, RBAC
def test_services_select_color_and_revision_and_only_ready_pods() -> None:
    active = build_active_service(dsd(), "blue", "r1")
    preview = build_preview_service(dsd(), "green", "r2")
    assert active["metadata"]["name"] == "chat" and preview["metadata"]["name"] == "chat-preview"
    assert active["spec"]["selector"] == {"deepseek.ai/deployment": "chat", "deepseek.ai/color": "blue",
                                          "deepseek.ai/revision": "r1"}
    assert preview["spec"]["selector"]["deepseek.ai/color"] == "green"
    assert preview["spec"]["publishNotReadyAddresses"] is False
    assert active["spec"]["ports"][0]["port"] == 8000
    assert endpoint_url("team", "chat") == "http://chat.team.svc:8000/v1"


def test_server_role_reads_only_its_own_auth_configmap() -> None:
    account, role, binding = build_server_account(dsd())
    assert account["metadata"]["name"] == "chat-server"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["chat-auth"],
                              "verbs": ["get", "watch"]}]
    assert binding["roleRef"]["name"] == "chat-server"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chat-server", "namespace": "team"}]


# ------------------------------------------------------------------------------------------------ capacity
def test_gpu_shortage_counts_only_gpu_unschedulable_pods() -> None:
    def pod(message: str | None, deleting: bool = False) -> dict[str, Any]:
        conditions = [] if message is None else [{"type": "PodScheduled", "status": "False",
                                                  "reason": "Unschedulable", "message": message}]
        meta: dict[str, Any] = {"name": "p"}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": meta, "status": {"conditions": conditions}}

    gpu = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    shortage = gpu_shortage([pod(gpu), pod(gpu), pod("node(s) had untolerated taint"), pod(None), pod(gpu, True)],
                            "nvidia.com/gpu", 4)
    assert shortage is not None and shortage.pending_pods == 2 and shortage.gpus_missing == 8
    assert "Insufficient nvidia.com/gpu" in shortage.describe("green")
    assert gpu_shortage([pod("node(s) had untolerated taint")], "nvidia.com/gpu", 1) is None


# ------------------------------------------------------------------------------------------------ verification
def test_ready_endpoints_skip_unready_and_terminating() -> None:
    slices = [{"endpoints": [
        {"addresses": ["10.244.0.5"], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": "a"}},
        {"addresses": ["10.244.0.6"], "conditions": {"ready": False}, "targetRef": {"kind": "Pod", "name": "b"}},
        {"addresses": ["10.244.0.7"], "conditions": {"ready": True, "terminating": True},
         "targetRef": {"kind": "Pod", "name": "c"}},
    ]}, {"endpoints": None}]
    assert ready_endpoints(slices) == [Endpoint("a", "10.244.0.5")]


def test_judge_passes_and_fails_on_thresholds() -> None:
    settings = AnalysisSettings(requests=4, max_error_rate=0.25, max_latency_ms=1000)
    good = [Outcome("a", True, 100, "ok"), Outcome("b", True, 120, "ok"), Outcome("a", True, 90, "ok"),
            Outcome("b", False, 50, "HTTP 500: boom")]
    result = judge(good, settings, ["a", "b"])
    assert result["passed"] and result["errors"] == 1 and result["errorRate"] == 0.25
    assert result["p95LatencyMs"] == 120
    bad = judge([Outcome("a", False, 5, "HTTP 500: boom")] * 2 + [Outcome("b", True, 10, "ok")] * 2, settings,
                ["a", "b"])
    assert not bad["passed"] and "HTTP 500" in bad["message"]
    slow = judge([Outcome("a", True, 5000, "ok")], settings, ["a"])
    assert not slow["passed"] and "p95 latency" in slow["message"]
    silent = judge([Outcome("a", True, 5, "ok")], settings, ["a", "b"])
    assert not silent["passed"] and "b" in silent["message"]
    assert not judge([], settings, [])["passed"]


def test_metrics_parsing_counts_api_routes_and_5xx() -> None:
    text = "\n".join([
        "# HELP deepseek_api_requests_total API requests by route and status code",
        "# TYPE deepseek_api_requests_total counter",
        'deepseek_api_requests_total{route="/v1/chat/completions",status="200"} 40.0',
        'deepseek_api_requests_total{route="/v1/chat/completions",status="503"} 2.0',
        'deepseek_api_requests_total{route="/v1/completions",status="401"} 3.0',
        'deepseek_api_requests_total{route="/ready",status="200"} 500.0',
        'deepseek_api_errors_total{route="/v1/chat/completions",status="503"} 2.0',
    ])
    assert parse_request_counts(text) == (45, 2)


def test_verification_token_follows_the_contract() -> None:
    key = new_signing_key(1_800_000_000)
    grant = verification_grant(namespace="team", deployment="chat", deployment_uid="uid-1", token_id="j" * 22,
                               now=1_800_000_000)
    token = sign_token(grant, key)
    claims = jwt.decode(token, key.private_key().public_key(), algorithms=["EdDSA"], audience="team/chat",
                        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})
    assert claims["sub"] == "system:deepseek-operator" and claims["uid"] == "uid-1"
    assert claims["scope"] == ["model:predict"] and claims["env"] == "prod"
    assert claims["iss"] == "deepseek-operator/team/chat"
    assert 0 < claims["exp"] - claims["iat"] <= 600
    assert jwt.get_unverified_header(token)["kid"] == key.kid


# ------------------------------------------------------------------------------------------------ status writing
def test_status_patch_deletes_dropped_rollout_fields_and_keeps_untouched_ones() -> None:
    from deepseek_operator.serving import status_patch

    previous = {"signingKeyId": "k1", "rollout": {"phase": "Starting", "deadline": "t1", "revision": "r"},
                "history": [{"revision": "a"}]}
    new = {"rollout": {"phase": "Verifying", "revision": "r"}, "history": [{"revision": "a"}], "failedRevision": None}
    assert status_patch(previous, new) == {"rollout": {"phase": "Verifying", "deadline": None}}


def test_rollout_timing_from_env() -> None:
    from deepseek_operator.serving import RolloutTiming

    timing = RolloutTiming.from_env({"DEEPSEEK_OPERATOR_ROLLOUT_PROGRESSING_INTERVAL": "500ms",
                                     "DEEPSEEK_OPERATOR_ROLLOUT_STABLE_INTERVAL": "1m"})
    assert (timing.progressing_interval, timing.stable_interval) == (0.5, 60.0)
    with pytest.raises(ValueError, match="DEEPSEEK_OPERATOR_ROLLOUT_STABLE_INTERVAL"):
        RolloutTiming.from_env({"DEEPSEEK_OPERATOR_ROLLOUT_STABLE_INTERVAL": "soon"})
