"""Pure builders of the serving children, the revision hash, capacity reading and verification judging."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from deepseek_operator.capacity import gpu_shortage
from deepseek_operator.engines import DEFAULT_VLLM_IMAGE, vllm_args
from deepseek_operator.key_material import new_signing_key
from deepseek_operator.revision import compute_revision
from deepseek_operator.tokens import sign_token
from deepseek_operator.verification import (
    AnalysisSettings,
    Endpoint,
    Outcome,
    completion_problem,
    judge,
    parse_request_counts,
    ready_endpoints,
    request_plan,
    stream_problem,
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

REPO = Path(__file__).resolve().parents[2]


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
    assert "--host  --port 8000" in joined and "--redis-url redis://r:6379/0" in joined
    assert "--max-model-len 2048" in joined and "--no-cache" in args


@pytest.mark.parametrize(("cpu", "threads"), [("8", "8"), (4, "4"), ("500m", "1"), ("1500m", "2"), ("2.5", "3"),
                                             ("1k", "1000"), ("2e1", "20"), ("1024", "1024"),
                                             ("1025", "1024"), ("1e20", "1024"), ("1e400", "1024"), ("5E", "1024")])
def test_the_builtin_engine_gets_a_torch_thread_per_requested_cpu(cpu: str | int, threads: str) -> None:
    """A pod sees every core of its node: torch's threads come from the replica's CPU request, rounded up."""
    args = server_args(dsd(resources={"gpus": 0, "cpu": cpu}))
    assert args[args.index("--torch-threads") + 1] == threads


def test_no_cpu_request_leaves_the_thread_count_to_the_server() -> None:
    assert "--torch-threads" not in server_args(dsd(resources={"gpus": 0}))
    # the gateway in front of vLLM runs no torch; vLLM sizes its own threads
    assert "--torch-threads" not in server_args(dsd(engine={"name": "vllm"}, resources={"gpus": 1, "cpu": "8"}))


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
    env = {e["name"]: e for e in init["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    # the server images run with HF_HUB_OFFLINE=1; the container that downloads must turn it off
    assert env["HF_HUB_OFFLINE"]["value"] == "0"


def test_redis_secret_ref_becomes_env() -> None:
    container = build_deployment(dsd(redis={"secretRef": {"name": "redis", "key": "url"}}), "blue", "r", 1)[
        "spec"]["template"]["spec"]["containers"][0]
    assert [e for e in container["env"] if e["name"] not in ("HOME", "DEEPSEEK_RECORD_KEY")] == [
        {"name": "DEEPSEEK_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "redis", "key": "url"}}}]
    assert not any(a.startswith("redis://") for a in container["args"])


@pytest.mark.parametrize("spec", [{}, {"engine": {"name": "vllm"}}])
def test_server_cache_is_keyed_by_deployment_and_revision_with_the_record_key_from_a_secret(
        spec: dict[str, Any]) -> None:
    from deepseek_operator.workloads import build_record_key_secret

    resource = dsd(**spec)
    revision = compute_revision(resource["spec"])
    container = build_deployment(resource, "green", revision, 1)["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--deployment team/chat" in args and f"--model-revision {revision}" in args
    env = {e["name"]: e for e in container["env"]}
    ref = env["DEEPSEEK_RECORD_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "chat-record-key", "key": "record-key"}
    assert "record" not in args  # the key itself never on the command line
    secret = build_record_key_secret(resource, "k" * 43)
    assert secret["metadata"]["name"] == ref["name"] and secret["stringData"] == {ref["key"]: "k" * 43}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == resource["metadata"]["uid"]
    other = build_deployment(resource, "blue", "another", 1)["spec"]["template"]["spec"]["containers"][0]
    assert "--model-revision another" in " ".join(other["args"])


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


# ------------------------------------------------------------------------------------------------ engines
VLLM = {"name": "vllm", "image": "vllm/vllm-openai:v0.32.0"}


def vllm_dsd(**spec: Any) -> dict[str, Any]:
    return dsd(**{"engine": dict(VLLM), **spec})


def containers(built: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in built["spec"]["template"]["spec"]["containers"]}


def test_vllm_pod_runs_the_engine_next_to_the_gateway() -> None:
    spec = vllm_dsd(resources={"gpus": 2, "gpuResourceName": "nvidia.com/gpu", "memory": "80Gi", "cpu": "16"},
                    server={"precision": "bf16", "maxBatchSize": 64, "maxModelLen": 16384, "maxNewTokens": 1024,
                            "cache": {"enabled": True, "ttlSeconds": 60}},
                    redis={"url": "redis://r:6379/0"})
    deployment = build_deployment(spec, "blue", "r", 1)
    assert deployment["spec"]["template"]["metadata"]["labels"]["deepseek.ai/engine"] == "vllm"
    assert "deepseek.ai/engine" not in deployment["spec"]["selector"]["matchLabels"]
    built = containers(deployment)
    assert list(built) == ["server", "engine"]
    engine, gateway = built["engine"], built["server"]
    assert engine["image"] == "vllm/vllm-openai:v0.32.0"
    assert engine["args"] == [
        "/models/model", "--host", "127.0.0.1", "--port", "8001",
        "--served-model-name", "deepseek-ai/deepseek-llm-7b-chat", "--tensor-parallel-size", "2",
        "--dtype", "bfloat16", "--max-num-seqs", "64", "--max-model-len", "16384", "--enable-prefix-caching",
        "--override-generation-config", '{"max_new_tokens":1024}', "--shutdown-timeout", "30"]
    assert gateway["image"] == "registry.example/deepseek-server:1.0"
    assert gateway["args"] == [
        "serve", "--engine", "vllm", "--engine-url", "http://127.0.0.1:8001",
        "--model-name", "deepseek-ai/deepseek-llm-7b-chat", "--host", "", "--port", "8000",
        "--auth-configmap", "team/chat-auth", "--max-new-tokens", "1024", "--cache-ttl", "60",
        "--deployment", "team/chat", "--model-revision", "r", "--redis-url", "redis://r:6379/0"]
    # The GPUs (and the memory the weights need) belong to vLLM; only the gateway has a port.
    assert engine["resources"] == {"requests": {"nvidia.com/gpu": "2", "memory": "80Gi", "cpu": "16"},
                                   "limits": {"nvidia.com/gpu": "2", "memory": "80Gi"}}
    assert gateway["resources"] == {} and "ports" not in engine
    assert gateway["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert {m["mountPath"] for m in engine["volumeMounts"]} == {"/models/model", "/dev/shm", "/tmp"}
    assert [m["mountPath"] for m in gateway["volumeMounts"]] == ["/tmp"]  # the read-only root's writable dir


def test_vllm_probes_reach_the_engine_on_loopback_and_wait_for_its_start() -> None:
    built = containers(build_deployment(vllm_dsd(rollout={"progressDeadlineSeconds": 3600}), "blue", "r", 1))
    engine, gateway = built["engine"], built["server"]
    startup, liveness = engine["startupProbe"], engine["livenessProbe"]
    assert startup["exec"]["command"][0] == "python3"
    assert "http://127.0.0.1:8001/health" in startup["exec"]["command"][-1]
    assert liveness["exec"] == startup["exec"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
    assert "readinessProbe" not in engine  # the gateway's /ready asks the engine for a real answer
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize(("precision", "expected"), [
    ("bf16", ["--dtype", "bfloat16"]),
    ("fp16", ["--dtype", "float16"]),
    ("fp32", ["--dtype", "float32"]),
    ("fp8", ["--dtype", "bfloat16", "--quantization", "fp8"]),
])
def test_vllm_precision_maps_to_dtype_and_quantization(precision: str, expected: list[str]) -> None:
    args = vllm_args(vllm_dsd(server={"precision": precision})["spec"], "/models/model")
    start = args.index("--dtype")
    assert args[start:start + len(expected)] == expected
    assert ("--quantization" in args) == (precision == "fp8")


def test_vllm_refuses_int8() -> None:
    with pytest.raises(ValueError, match="int8"):
        vllm_args(vllm_dsd(server={"precision": "int8"})["spec"], "/models/model")


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_vllm_tensor_parallel_size_is_the_replica_gpus(gpus: int) -> None:
    spec = vllm_dsd(resources={"gpus": gpus})
    args = vllm_args(spec["spec"], "/models/model")
    assert args[args.index("--tensor-parallel-size") + 1] == str(gpus)
    engine = containers(build_deployment(spec, "blue", "r", 1))["engine"]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)


def test_vllm_optional_args_prefix_caching_extra_args_and_env() -> None:
    plain = vllm_args(vllm_dsd(server={})["spec"], "/m")
    assert "--max-num-seqs" not in plain and "--max-model-len" not in plain  # vLLM's own defaults
    # by default the engine never goes to the Hub (its weights are in /models) and sends no usage statistics
    default_env = containers(build_deployment(vllm_dsd(server={}), "blue", "r", 1))["engine"]["env"]
    assert [e for e in default_env if e["name"] != "HOME"] == [{"name": "HF_HUB_OFFLINE", "value": "1"},
                                                               {"name": "VLLM_NO_USAGE_STATS", "value": "1"}]
    spec = vllm_dsd(engine={**VLLM, "prefixCaching": False, "extraArgs": ["--gpu-memory-utilization", "0.85"],
                            "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},
                                    {"name": "HF_HUB_OFFLINE", "value": "0"}]})
    engine = containers(build_deployment(spec, "blue", "r", 1))["engine"]
    assert engine["args"][-7:] == ["--no-enable-prefix-caching", "--override-generation-config",
                                   '{"max_new_tokens":512}', "--shutdown-timeout", "30", "--gpu-memory-utilization",
                                   "0.85"]
    assert [e for e in engine["env"] if e["name"] != "HOME"] == [{"name": "VLLM_NO_USAGE_STATS", "value": "1"},
                             {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},
                             {"name": "HF_HUB_OFFLINE", "value": "0"}]


def test_vllm_pod_with_hub_weights_fetches_them_for_the_engine() -> None:
    spec = vllm_dsd(model={"name": "deepseek-ai/x", "source": {"huggingFace": {}}})
    pod = build_deployment(spec, "blue", "r", 1)["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["command"][:3] == ["hf", "download", "deepseek-ai/x"]
    engine = containers(build_deployment(spec, "blue", "r", 1))["engine"]
    assert {"name": "model", "mountPath": "/models"} in engine["volumeMounts"]
    assert engine["args"][0] == "/models/model"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]


@pytest.mark.parametrize(("spec", "names"), [
    (dsd(), {"server"}),
    (vllm_dsd(model={"name": "deepseek-ai/x", "source": {"huggingFace": {}}}), {"fetch-model", "server", "engine"}),
], ids=["builtin", "vllm-with-hub-weights"])
def test_every_container_reports_the_end_of_its_log_when_it_fails(spec: dict[str, Any], names: set[str]) -> None:
    # a server whose model cannot be loaded exits; the end of its log is then the reason the pod status shows
    pod = build_deployment(spec, "blue", "r", 1)["spec"]["template"]["spec"]
    policies = {c["name"]: c.get("terminationMessagePolicy") for c in [*pod.get("initContainers", []),
                                                                        *pod["containers"]]}
    assert policies == dict.fromkeys(names, "FallbackToLogsOnError")


@pytest.mark.parametrize("spec", [dsd(), vllm_dsd()], ids=["builtin", "vllm"])
def test_pods_get_no_variables_for_the_namespaces_services(spec: dict[str, Any]) -> None:
    """A Service named `vllm` (a deployment of that name serves through one) would become VLLM_PORT=tcp://IP:8000
    in every pod of the namespace: vLLM reads VLLM_PORT as its own setting, refuses a URI there and never starts."""
    pod = build_deployment(spec, "blue", "r", 1)["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False


def test_builtin_pod_is_unchanged_by_an_explicit_builtin_engine() -> None:
    explicit = dsd(engine={"name": "builtin", "image": DEFAULT_VLLM_IMAGE})
    assert build_deployment(explicit, "blue", "r", 1) == build_deployment(dsd(), "blue", "r", 1)
    assert [c["name"] for c in build_deployment(dsd(), "blue", "r", 1)["spec"]["template"]["spec"]["containers"]] \
        == ["server"]
    assert compute_revision(explicit["spec"]) == compute_revision(dsd()["spec"])


@pytest.mark.parametrize("change", [
    {"engine": dict(VLLM)},
    {"engine": {**VLLM, "image": "vllm/vllm-openai:v0.33.0"}},
    {"engine": {**VLLM, "prefixCaching": False}},
    {"engine": {**VLLM, "extraArgs": ["--enforce-eager"]}},
    {"engine": {**VLLM, "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}]}},
])
def test_revision_changes_with_the_engine(change: dict[str, Any]) -> None:
    revisions = {compute_revision(dsd()["spec"]), compute_revision(vllm_dsd()["spec"]),
                 compute_revision(dsd(**change)["spec"])}
    assert len(revisions) == (2 if change["engine"] == VLLM else 3)


def test_revision_resolves_engine_defaults() -> None:
    assert compute_revision(vllm_dsd(engine={"name": "vllm"})["spec"]) == compute_revision(vllm_dsd()["spec"])
    assert compute_revision(vllm_dsd(engine={**VLLM, "prefixCaching": True})["spec"]) == \
        compute_revision(vllm_dsd()["spec"])


def test_default_vllm_image_is_the_crds() -> None:
    crd = yaml.safe_load((REPO / "crds" / "deepseekdeployments.deepseek.ai.yaml").read_text())
    engine = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["engine"]
    assert engine["properties"]["image"]["default"] == DEFAULT_VLLM_IMAGE


# ------------------------------------------------------------------------------------------------ services, RBAC
@pytest.mark.parametrize("spec", [dsd(), vllm_dsd(model={"name": "deepseek-ai/x", "source": {"huggingFace": {}}})],
                         ids=["builtin", "vllm"])
def test_pods_keep_serving_until_their_endpoints_are_gone(spec: dict[str, Any]) -> None:
    """A deleted pod stays in the Services' endpoints for a moment (EndpointSlice controller, then each node's
    proxy): every container sleeps in preStop before its SIGTERM, and the grace period still leaves the server its
    whole graceful shutdown after that sleep."""
    from deepseek_server.settings import ServerSettings

    pod = build_deployment(spec, "blue", "r", 2)["spec"]["template"]["spec"]
    sleeps = [c["lifecycle"]["preStop"]["sleep"]["seconds"] for c in pod["containers"]]
    assert len(sleeps) == len(pod["containers"]) and min(sleeps) >= 3
    # plain init containers may not have lifecycle hooks (the API server rejects them)
    assert all("lifecycle" not in c for c in pod.get("initContainers") or [])
    server_grace = ServerSettings.model_fields["shutdown_grace_s"].default
    assert pod["terminationGracePeriodSeconds"] >= max(sleeps) + server_grace


def test_shutdown_grace_reaches_the_server_and_the_pods_grace_period() -> None:
    default = build_deployment(dsd(), "blue", "r", 1)["spec"]["template"]["spec"]
    assert "--shutdown-grace-s" not in default["containers"][0]["args"]  # unchanged pods for specs without it
    spec = dsd(server={"precision": "bf16", "shutdownGraceSeconds": 120})
    pod = build_deployment(spec, "blue", "r", 1)["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--shutdown-grace-s") + 1] == "120"
    sleep = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] == sleep + 120 > default["terminationGracePeriodSeconds"]
    assert compute_revision(spec["spec"]) != compute_revision(dsd()["spec"])  # new pods: a rollout


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
    # The index and its shards (docs/auth-contract.md), by name: never the namespace's other ConfigMaps.
    shards = [f"chat-auth-{i}" for i in range(16)]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": ["chat-auth", *shards], "verbs": ["get", "watch"]}]
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


CHUNK = ('data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":%s},'
         '"finish_reason":%s}]}')


def test_a_streamed_smoke_answer_passes_only_when_it_generated_and_finished() -> None:
    usage = 'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"completion_tokens":2}}'
    good = "\n\n".join([CHUNK % ('"Hi"', "null"), CHUNK % ('" there"', "null"), CHUNK % ('""', '"length"'), usage,
                         "data: [DONE]", ""])
    assert stream_problem(good) is None
    # the error event a stream carries when it fails after its 200: the builtin engine's, or vLLM's then [DONE]
    builtin = "\n\n".join([CHUNK % ('"Hi"', "null"), 'data: {"error":{"message":"The model failed while generating: '
                            'boom","type":"server_error","param":null,"code":null}}', ""])
    assert stream_problem(builtin) == "error event after HTTP 200: The model failed while generating: boom"
    vllm = 'data: {"error": {"message": "EngineCore encountered an issue.", "code": 500}}\n\ndata: [DONE]\n\n'
    assert stream_problem(vllm) == "error event after HTTP 200: EngineCore encountered an issue."
    assert stream_problem("\n\n".join([CHUNK % ('"Hi"', "null"), ""])) == "the stream ended without a finish_reason"
    assert stream_problem("\n\n".join([CHUNK % ('""', '"stop"'), "data: [DONE]", ""])) == "empty completion"
    assert stream_problem("data: {not json\n\n").startswith("unreadable stream event")
    assert stream_problem("") == "the stream ended without a finish_reason"


def test_an_unstreamed_smoke_answer_passes_only_when_it_generated() -> None:
    assert completion_problem(b'{"choices":[{"message":{"content":"Hi"}}],"usage":{"completion_tokens":1}}') is None
    assert completion_problem(b'{"choices":[{"message":{"content":""}}],"usage":{"completion_tokens":0}}') == (
        "empty completion")
    assert completion_problem(b'{"choices":[]}').startswith("unreadable completion")
    assert completion_problem(b"<html>").startswith("unreadable completion")


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


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies it."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def test_then_patch_does_what_both_patches_do_one_after_the_other() -> None:
    from deepseek_operator.serving import then_patch

    stored = {"signingKeyId": "k1", "authConfigMap": "chat-auth", "observedGeneration": 1,
              "conditions": [{"type": "IssuerReady", "observedGeneration": 1}],
              "rollout": {"phase": "Starting", "deadline": "t1", "revision": "r"}, "endpoint": "http://x"}
    issuer = {"signingKeyId": "k2", "conditions": [{"type": "IssuerReady", "observedGeneration": 2}]}
    serving = {"observedGeneration": 2, "endpoint": None, "rollout": {"phase": "Verifying", "deadline": None},
               "conditions": [{"type": "IssuerReady", "observedGeneration": 2}, {"type": "Ready"}]}
    for first, then in ((issuer, serving), (serving, issuer), ({"rollout": {"phase": "P"}}, {"rollout": None}),
                        ({"rollout": {"phase": "P", "x": None}}, {"rollout": {"x": 1, "deadline": None}}),
                        ({}, serving), (issuer, {}), ({}, {})):
        both = then_patch(first, then)
        assert both is not None and _merge(stored, both) == _merge(_merge(stored, first), then)
    # a map deleted or replaced, then patched: which keys to delete depends on what is stored, so no single patch
    assert then_patch({"rollout": None}, {"rollout": {"phase": "P"}}) is None
    assert then_patch({"rollout": "gone"}, {"rollout": {"phase": "P"}}) is None
    assert then_patch({"a": {"rollout": None}}, {"a": {"rollout": {"phase": "P"}}}) is None
    assert then_patch(issuer, serving) == {**serving, "signingKeyId": "k2"}
    assert issuer == {"signingKeyId": "k2", "conditions": [{"type": "IssuerReady", "observedGeneration": 2}]}


def test_rollout_timing_from_env() -> None:
    from deepseek_operator.serving import RolloutTiming

    timing = RolloutTiming.from_env({"DEEPSEEK_OPERATOR_ROLLOUT_PROGRESSING_INTERVAL": "500ms",
                                     "DEEPSEEK_OPERATOR_ROLLOUT_STABLE_INTERVAL": "1m"})
    assert (timing.progressing_interval, timing.stable_interval) == (0.5, 60.0)
    with pytest.raises(ValueError, match="DEEPSEEK_OPERATOR_ROLLOUT_STABLE_INTERVAL"):
        RolloutTiming.from_env({"DEEPSEEK_OPERATOR_ROLLOUT_STABLE_INTERVAL": "soon"})


@pytest.mark.parametrize("pods", [1, 2, 3, 4])
def test_verification_streams_half_its_requests_and_each_pod_gets_both_kinds(pods: int) -> None:
    """A pod sent two or more verification requests gets an unstreamed and a streamed one (with every second request
    streamed over an even number of pods, half the pods were never sent a stream)."""
    endpoints = [Endpoint(f"p{i}", f"10.0.0.{i}") for i in range(pods)]
    plan = request_plan(endpoints, 4 * pods)
    assert len(plan) == 4 * pods and sum(stream for _, stream in plan) == 2 * pods
    for endpoint in endpoints:
        assert {stream for e, stream in plan if e is endpoint} == {False, True}
    assert [e.pod for e, _ in request_plan(endpoints, 1)] == [e.pod for e in endpoints]  # at least one per pod
    assert request_plan([], 5) == []
