"""The CRDs reject bad objects at `kubectl apply`, with a message that says what to fix (table-driven)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

KUBECTL = str(Path(sys.executable).with_name("kubectl"))

APIKEY = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "ApiKey", "metadata": {"name": "k"},
          "spec": {"deploymentRef": {"name": "chat"}, "subject": "alice", "environment": "dev"}}
DSD = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment", "metadata": {"name": "chat"},
       "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "deepseek-server:1"}}


def edited(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """`base` with the dotted `path` set to `value` (or removed when value is ...)."""
    obj = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = obj
    for part in parents:
        node = node.setdefault(part, {})
    if value is ...:
        node.pop(last)
    else:
        node[last] = value
    return obj


def apply(kubeconfig: str, namespace: str, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, "apply", "-n", namespace, "-f", "-"], input=json.dumps(obj), text=True,
                          capture_output=True, env={**os.environ, "KUBECONFIG": kubeconfig}, timeout=30)


INVALID = [
    ("apikey without subject", edited(APIKEY, "spec.subject", ...), "spec.subject: Required value"),
    ("apikey without deploymentRef", edited(APIKEY, "spec.deploymentRef", ...), "spec.deploymentRef: Required"),
    ("unknown environment", edited(APIKEY, "spec.environment", "staging"), 'Unsupported value: "staging"'),
    ("unknown scope", edited(APIKEY, "spec.scopes", ["model:predict", "admin:all"]), 'Unsupported value: "admin:all"'),
    ("duplicate scope", edited(APIKEY, "spec.scopes", ["model:predict", "model:predict"]), "Duplicate value"),
    ("duration in days", edited(APIKEY, "spec.duration", "3d"), "spec.duration in body should match"),
    ("duration too short", edited(APIKEY, "spec.duration", "5s"), "duration must be between 10s and 8760h"),
    ("renewBefore not shorter than duration",
     edited(edited(APIKEY, "spec.duration", "30s"), "spec.renewBefore", "30s"),
     "renewBefore must be shorter than duration"),
    ("name too long for its default Secret name", edited(APIKEY, "metadata.name", "k" * 247),
     "needs spec.secretName"),
    ("duration under the default renewBefore",
     edited(APIKEY, "spec.duration", "1h"), "renewBefore is 24h (24h when left out), duration is 1h"),
    ("renewBefore under the default gracePeriod",
     edited(APIKEY, "spec.renewBefore", "30m"), "gracePeriod is 1h (1h when left out), renewBefore is 30m"),
    ("grace longer than renewBefore",
     edited(edited(APIKEY, "spec.renewBefore", "1h"), "spec.gracePeriod", "2h"),
     "gracePeriod must not exceed renewBefore"),
    ("zero requests per second", edited(APIKEY, "spec.rateLimit", {"requestsPerSecond": 0}),
     "spec.rateLimit.requestsPerSecond: Invalid value"),
    ("zero burst", edited(APIKEY, "spec.rateLimit", {"burst": 0}), "should be greater than or equal to 1"),
    ("deployment name with capitals", edited(APIKEY, "spec.deploymentRef.name", "Chat_1"),
     "spec.deploymentRef.name in body should match"),
    ("secret name not a DNS name", edited(APIKEY, "spec.secretName", "Bad_Name"),
     "spec.secretName in body should match"),
    ("misspelt field", edited(APIKEY, "spec.scope", ["model:predict"]), 'unknown field "spec.scope"'),
    ("deployment without image", edited(DSD, "spec.image", ...), "spec.image: Required value"),
    ("two model sources", edited(DSD, "spec.model.source", {"pvc": {"claimName": "w"}, "hostPath": {"path": "/m"}}),
     "model.source must set exactly one of pvc, hostPath or huggingFace"),
    ("unknown precision", edited(DSD, "spec.server", {"precision": "int4"}), 'Unsupported value: "int4"'),
    ("preview larger than replicas",
     edited(edited(DSD, "spec.replicas", 2), "spec.rollout", {"previewReplicas": 3}),
     "rollout.previewReplicas must not exceed replicas"),
    ("memory not a quantity", edited(DSD, "spec.resources", {"memory": "40 GB"}),
     "spec.resources.memory in body should match"),
    # The API server refuses a pod that requests less than nothing: the rollout would wait in Provisioning forever.
    ("negative cpu", edited(DSD, "spec.resources", {"cpu": "-2"}), "resources.cpu must not be negative"),
    ("negative cpu as a number", edited(DSD, "spec.resources", {"cpu": -1}), "resources.cpu must not be negative"),
    ("negative memory", edited(DSD, "spec.resources", {"memory": "-1Gi"}), "resources.memory must not be negative"),
    ("redis url and secret", edited(DSD, "spec.redis", {"url": "redis://r:6379", "secretRef": {"name": "s"}}),
     "redis must set exactly one of url or secretRef"),
    ("error rate above one", edited(DSD, "spec.rollout", {"analysis": {"maxErrorRate": 1.5}}),
     "should be less than or equal to 1"),
    ("unknown strategy", edited(DSD, "spec.rollout", {"strategy": "Canary"}), 'Unsupported value: "Canary"'),
    ("deployment name with a dot", edited(DSD, "metadata.name", "chat.v1"),
     "must start with a lowercase letter and contain only lowercase letters, digits and '-'"),
    ("unknown engine", edited(DSD, "spec.engine", {"name": "sglang"}), 'Unsupported value: "sglang"'),
    ("int8 on vllm", edited(edited(DSD, "spec.engine", {"name": "vllm"}), "spec.server", {"precision": "int8"}),
     "server.precision int8 needs engine builtin; with engine vllm use fp8"),
    ("fp8 on the default engine", edited(DSD, "spec.server", {"precision": "fp8"}),
     "server.precision fp8 needs engine vllm"),
    ("fp8 on builtin", edited(edited(DSD, "spec.engine", {"name": "builtin"}), "spec.server", {"precision": "fp8"}),
     "server.precision fp8 needs engine vllm"),
    ("vllm without gpus", edited(edited(DSD, "spec.engine", {"name": "vllm"}), "spec.resources", {"gpus": 0}),
     "engine vllm needs resources.gpus of at least 1"),
    ("extraArgs on builtin", edited(DSD, "spec.engine", {"extraArgs": ["--enforce-eager"]}),
     "engine.extraArgs applies to the vllm engine only"),
    ("env on builtin", edited(DSD, "spec.engine", {"env": [{"name": "A", "value": "1"}]}),
     "engine.env applies to the vllm engine only"),
    ("prefixCaching on builtin", edited(DSD, "spec.engine", {"name": "builtin", "prefixCaching": True}),
     "engine.prefixCaching applies to the vllm engine only"),
    *[(f"extraArgs sets {flag}", edited(DSD, "spec.engine", {"name": "vllm", "extraArgs": ["--enforce-eager", flag]}),
       "engine.extraArgs must not set --model")
      for flag in ("--tensor-parallel-size=4", "-tp", "--max_model_len", "--port", "--no-enable-prefix-caching",
                   "--dtype=half", "--api-key", "--override-generation-config={}",
                   "--shutdown-timeout=5")],
    # vLLM's parser takes these too, and the last value wins: a short option with its value attached, argparse's
    # abbreviations of a long option (allow_abbrev is on), the dotted JSON form and --config, which reads flags
    # from a YAML file.
    *[(f"extraArgs sets {' '.join(args)}",
       edited(DSD, "spec.engine", {"name": "vllm", "extraArgs": ["--enforce-eager", *args]}),
       "engine.extraArgs must not set --model")
      for args in (["-qfp8"], ["-tp4"], ["-t", "4"], ["--override-generation-config.max_new_tokens", "99999"],
                   ["--override_generation_config.max_new_tokens=99999"], ["--override.max_new_tokens", "99999"],
                   ["--tensor-parallel", "4"], ["--tensor_parallel=4"], ["--served-model", "x"],
                   ["--max-model", "1000"], ["--te", "4"], ["--ho", "0.0.0.0"], ["--ov", "{}"],
                   ["--no-enable-prefix"], ["--config", "/models/vllm.yaml"], ["--config=/models/vllm.yaml"],
                   # vLLM then listens on a socket file, or speaks TLS, or serves no API: the gateway cannot reach it
                   ["--uds", "/tmp/v.sock"], ["--ssl-certfile", "/c.pem"], ["--ssl-keyfile=/k.pem"], ["--headless"])],
    ("engine env sets VLLM_API_KEY", edited(DSD, "spec.engine", {"name": "vllm", "env": [
        {"name": "VLLM_LOGGING_LEVEL", "value": "INFO"}, {"name": "VLLM_API_KEY", "value": "x"}]}),
     "engine.env must not set VLLM_API_KEY"),
    # what a pod's resources refuse (the name "requests." + it must be a qualified name, and not a native resource)
    ("gpu resource under requests.", edited(DSD, "spec.resources", {"gpuResourceName": "requests.nvidia.com/gpu"}),
     "resources.gpuResourceName must be an extended resource name"),
    ("gpu resource of kubernetes.io", edited(DSD, "spec.resources", {"gpuResourceName": "kubernetes.io/gpu"}),
     "resources.gpuResourceName must be an extended resource name"),
    ("gpu resource domain of 245", edited(DSD, "spec.resources", {"gpuResourceName": "p" * 245 + "/gpu"}),
     "resources.gpuResourceName must be an extended resource name"),
    # what a Secret key may not be (an env var's secretKeyRef with it makes the pod invalid)
    *[(f"secret key {key!r}", edited(DSD, "spec.redis", {"secretRef": {"name": "r", "key": key}}),
       "a Secret key may not be '.', nor begin with '..'") for key in (".", "..", "..data")],
    ("hub token secret key '.'", edited(DSD, "spec.model", {"name": "deepseek-ai/x", "source": {
        "huggingFace": {"tokenSecretRef": {"name": "hf", "key": "."}}}}),
     "a Secret key may not be '.', nor begin with '..'"),
    ("engine env name with a dash", edited(DSD, "spec.engine", {"name": "vllm", "env": [{"name": "A-B"}]}),
     "spec.engine.env[0].name in body should match"),
    # What the API server would refuse in the pods is refused here, at apply, rather than in a rollout.
    ("image with a space", edited(DSD, "spec.image", "deepseek-server: 1"), "image must not contain spaces"),
    ("vllm image with a trailing newline", edited(DSD, "spec.engine", {"name": "vllm", "image": "vllm/vllm-openai\n"}),
     "engine.image must not contain spaces or other whitespace"),
    ("gpu resource without a domain", edited(DSD, "spec.resources", {"gpuResourceName": "gpu"}),
     "resources.gpuResourceName must be an extended resource name with a domain"),
    ("cpu as the gpu resource", edited(DSD, "spec.resources", {"gpuResourceName": "cpu"}),
     "resources.gpuResourceName must be an extended resource name with a domain"),
    ("subPath leaving the volume",
     edited(DSD, "spec.model.source", {"pvc": {"claimName": "w", "subPath": "m/../../x"}}),
     "model.source.pvc.subPath must be a relative path inside the volume, without '..'"),
    ("absolute subPath", edited(DSD, "spec.model.source", {"pvc": {"claimName": "w", "subPath": "/m"}}),
     "model.source.pvc.subPath must be a relative path inside the volume"),
    ("hostPath with ..", edited(DSD, "spec.model.source", {"hostPath": {"path": "/models/../etc"}}),
     "model.source.hostPath.path must not contain '..'"),
    ("claim name not a DNS name", edited(DSD, "spec.model.source", {"pvc": {"claimName": "Weights_1"}}),
     "spec.model.source.pvc.claimName in body should match"),
    ("token secret key with a slash",
     edited(DSD, "spec.model.source", {"huggingFace": {"tokenSecretRef": {"name": "hf", "key": "a/b"}}}),
     "spec.model.source.huggingFace.tokenSecretRef.key in body should match"),
    ("empty redis secret key", edited(DSD, "spec.redis", {"secretRef": {"name": "r", "key": ""}}),
     "spec.redis.secretRef.key in body should be at least 1 chars long"),
    ("redis port out of range", edited(DSD, "spec.redis", {"url": "redis://redis:65536/0"}),
     "with a port from 0 to 65535"),
    ("redis url without a host", edited(DSD, "spec.redis", {"url": "redis://"}), "redis.url must be redis://HOST"),
    ("context shorter than the server takes", edited(DSD, "spec.server", {"maxModelLen": 8}),
     "spec.server.maxModelLen in body should be greater than or equal to 16"),
    ("toleration without key or Exists", edited(DSD, "spec.scheduling", {"tolerations": [{"operator": "Equal"}]}),
     "a toleration without a key must use operator Exists"),
    ("toleration Exists with a value",
     edited(DSD, "spec.scheduling", {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]}),
     "a toleration with operator Exists must not set a value"),
    ("tolerationSeconds without NoExecute",
     edited(DSD, "spec.scheduling", {"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule",
                                                      "tolerationSeconds": 30}]}),
     "tolerationSeconds applies to effect NoExecute only"),
    ("toleration key with a space", edited(DSD, "spec.scheduling", {"tolerations": [{"key": "a b",
                                                                                     "operator": "Exists"}]}),
     "spec.scheduling.tolerations[0].key in body should match"),
    ("node selector key with a space", edited(DSD, "spec.scheduling", {"nodeSelector": {"gpu pool": "a"}}),
     "scheduling.nodeSelector keys must be label keys"),
    # a label key's prefix is a DNS subdomain, at most 253 characters: 254 passed the key's pattern and the API
    # server then refused the pods
    ("node selector key prefix too long", edited(DSD, "spec.scheduling", {"nodeSelector": {"p" * 254 + "/k": "a"}}),
     "scheduling.nodeSelector keys must be label keys"),
    ("toleration key prefix too long", edited(DSD, "spec.scheduling", {"tolerations": [
        {"key": "p" * 254 + "/k", "operator": "Exists"}]}),
     "the prefix of a label key (before '/') must be at most 253 characters"),
    ("topology key prefix too long", edited(DSD, "spec.scheduling", {"affinity": {"podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "podAffinityTerm": {"topologyKey": "p" * 254 + "/k"}}]}}}),
     "the prefix of a label key (before '/') must be at most 253 characters"),
    ("GPU resource name prefix too long", edited(DSD, "spec.resources", {"gpuResourceName": "p" * 254 + "/gpu"}),
     "resources.gpuResourceName must be an extended resource name"),
    ("node selector value too long", edited(DSD, "spec.scheduling", {"nodeSelector": {"pool": "p" * 64}}),
     "may not be more than 63 bytes"),
    ("priority class not a DNS name", edited(DSD, "spec.scheduling", {"priorityClassName": "High Priority"}),
     "spec.scheduling.priorityClassName in body should match"),
    # the API server adds matchLabelKeys to the selector from each pod's labels, then refuses the pod when the key
    # was there already: every pod of the rollout would be refused
    *[(f"matchLabelKeys key in the selector's {where}", edited(DSD, "spec.scheduling", {"affinity": {kind: {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "podAffinityTerm": {
            "topologyKey": "kubernetes.io/hostname", "labelSelector": selector,
            "matchLabelKeys": ["deepseek.ai/deployment"]}}]}}}),
       "a key of matchLabelKeys must not be in labelSelector too")
      for kind, where, selector in (
          ("podAntiAffinity", "matchLabels", {"matchLabels": {"deepseek.ai/deployment": "chat"}}),
          ("podAffinity", "matchExpressions", {"matchExpressions": [
              {"key": "deepseek.ai/deployment", "operator": "Exists"}]}))],
    ("matchLabelKeys key in a required term's selector", edited(DSD, "spec.scheduling", {"affinity": {
        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "x"}},
            "matchLabelKeys": ["app"]}]}}}),
     "a key of matchLabelKeys must not be in labelSelector too"),
    ("misspelt affinity field", edited(DSD, "spec.scheduling", {"affinity": {"nodeAffinty": {}}}),
     'unknown field "spec.scheduling.affinity.nodeAffinty"'),
    ("node affinity without terms",
     edited(DSD, "spec.scheduling", {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
         "nodeSelectorTerms": []}}}}),
     "nodeSelectorTerms in body should have at least 1 items"),
    ("node affinity In without values",
     edited(DSD, "spec.scheduling", {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
         "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In"}]}]}}}}),
     "a node selector requirement with operator In or NotIn needs values"),
    ("unknown node affinity operator",
     edited(DSD, "spec.scheduling", {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
         "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Contains", "values": ["a"]}]}]}}}}),
     'Unsupported value: "Contains"'),
    ("anti-affinity weight out of range",
     edited(DSD, "spec.scheduling", {"affinity": {"podAntiAffinity": {
         "preferredDuringSchedulingIgnoredDuringExecution": [
             {"weight": 0, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}}),
     "weight in body should be greater than or equal to 1"),
    ("pod affinity without topologyKey",
     edited(DSD, "spec.scheduling", {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
         {"labelSelector": {"matchLabels": {"app": "cache"}}}]}}}),
     "topologyKey: Required value"),
]


@pytest.mark.parametrize(("case", "obj", "message"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_object_is_rejected_with_a_readable_message(crds, kubeconfig, namespace, case, obj, message):
    result = apply(kubeconfig, namespace, obj)
    assert result.returncode != 0, f"{case}: accepted"
    assert message in result.stderr, result.stderr


def test_a_redis_url_with_a_password_is_refused_without_repeating_it(crds, kubeconfig, namespace):
    """The URL would be on the pods' command line; the refusal names the fix and never quotes the URL."""
    for url in ("redis://:s3cret-pw@redis:6379/0", "rediss://app:s3cret-pw@redis:99999",
                "redis://redis:6379/0?password=s3cret-pw", "rediss://redis/0?ssl_cert_reqs=none&Password=s3cret-pw",
                "redis://redis:6379?username=app&ssl_password=s3cret-pw", "redis://redis/0?p%61ssword=s3cret-pw"):
        result = apply(kubeconfig, namespace, edited(DSD, "spec.redis", {"url": url}))
        assert result.returncode != 0, url
        assert "redis.url must not carry credentials" in result.stderr and "set redis.secretRef" in result.stderr
        assert "s3cret-pw" not in result.stderr + result.stdout, result.stderr


def test_a_redis_url_with_other_query_arguments_is_accepted(crds, kubeconfig, namespace):
    for url in ("redis://redis:6379/0?socket_timeout=5", "rediss://redis:6380/1?ssl_cert_reqs=required"):
        result = apply(kubeconfig, namespace, edited(DSD, "spec.redis", {"url": url}))
        assert result.returncode == 0, result.stderr


def test_scheduling_as_in_a_pod_spec_is_accepted(crds, kubeconfig, namespace, api_client):
    """Everything a pod spec allows for placement still applies, and is stored as written."""
    from kubernetes import client

    scheduling = {
        "nodeSelector": {"gpu.example.com/pool": "h200", "spot": "", "p" * 253 + "/longest-prefix": ""},
        "tolerations": [{"operator": "Exists"},
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "p" * 253 + "/k", "operator": "Exists"},
                        {"key": "maintenance", "value": "soon", "effect": "NoExecute", "tolerationSeconds": 600}],
        "priorityClassName": "inference-critical",
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu.example.com/memory-gb", "operator": "Gt", "values": ["79"]},
                                          {"key": "cordoned", "operator": "DoesNotExist"}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-node-7"]}]}]},
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 100, "preference": {"matchExpressions": [
                        {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["eu-west-1a"]}]}}]},
            "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "chat"}},
                    "matchLabelKeys": ["pod-template-hash"]}}]},
            "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "topology.kubernetes.io/zone", "namespaces": ["cache"],
                 "labelSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["kv-cache"]}]}}]},
        },
    }
    obj = edited(edited(DSD, "spec.scheduling", scheduling), "spec.redis", {"url": "rediss://[fd00::1]:6380/2"})
    result = apply(kubeconfig, namespace, obj)
    assert result.returncode == 0, result.stderr
    stored = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "deepseek.ai", "v1alpha1", namespace, "deepseekdeployments", "chat")
    assert stored["spec"]["scheduling"] == scheduling


def test_valid_objects_are_accepted_with_schema_defaults(crds, kubeconfig, namespace, api_client):
    from kubernetes import client

    assert apply(kubeconfig, namespace, DSD).returncode == 0
    short = edited(edited(edited(APIKEY, "spec.duration", "30s"), "spec.renewBefore", "15s"),
                   "spec.gracePeriod", "10s")
    result = apply(kubeconfig, namespace, short)
    assert result.returncode == 0, result.stderr
    custom = client.CustomObjectsApi(api_client)
    stored = custom.get_namespaced_custom_object("deepseek.ai", "v1alpha1", namespace, "deepseekdeployments", "chat")
    assert stored["spec"]["replicas"] == 1 and stored["spec"]["server"]["precision"] == "bf16"
    assert stored["spec"]["rateLimit"] == {"requestsPerSecond": 10, "burst": 20}
    assert stored["spec"]["rollout"]["strategy"] == "BlueGreen"
    key = custom.get_namespaced_custom_object("deepseek.ai", "v1alpha1", namespace, "apikeys", "k")
    assert key["spec"]["revoked"] is False
    assert apply(kubeconfig, namespace, APIKEY | {"metadata": {"name": "d"}}).returncode == 0
    key = custom.get_namespaced_custom_object("deepseek.ai", "v1alpha1", namespace, "apikeys", "d")
    assert (key["spec"]["duration"], key["spec"]["renewBefore"], key["spec"]["gracePeriod"]) == ("72h", "24h", "1h")
    # A long name is fine with a Secret name of its own, and up to 246 characters without.
    long_named = edited(edited(APIKEY, "metadata.name", "k" * 253), "spec.secretName", "long-apikey")
    assert apply(kubeconfig, namespace, long_named).returncode == 0
    assert apply(kubeconfig, namespace, edited(APIKEY, "metadata.name", "k" * 246)).returncode == 0


def test_engine_choices_are_accepted_with_defaults(crds, kubeconfig, namespace, api_client):
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)
    vllm = edited(edited(edited(DSD, "spec.engine", {"name": "vllm", "extraArgs": ["--gpu-memory-utilization=0.85",
                                                                                   "--max-num-batched-tokens", "8192"],
                                                      "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}]}),
                         "spec.server", {"precision": "fp8", "maxModelLen": 16384}),
                  "spec.resources", {"gpus": 2})
    for name, obj in (("vllm", vllm), ("builtin-int8", edited(DSD, "spec.server", {"precision": "int8"})),
                      ("explicit-builtin", edited(DSD, "spec.engine", {"name": "builtin"})),
                      ("vllm-fp16", edited(DSD, "spec.engine", {"name": "vllm", "prefixCaching": False}))):
        result = apply(kubeconfig, namespace, edited(obj, "metadata.name", name))
        assert result.returncode == 0, f"{name}: {result.stderr}"
    stored = custom.get_namespaced_custom_object("deepseek.ai", "v1alpha1", namespace, "deepseekdeployments", "vllm")
    assert stored["spec"]["engine"]["image"] == "vllm/vllm-openai:v0.32.0"
    assert "maxBatchSize" not in stored["spec"]["server"]  # vLLM keeps its own default unless one is set
    plain = custom.get_namespaced_custom_object("deepseek.ai", "v1alpha1", namespace, "deepseekdeployments",
                                                "explicit-builtin")
    assert plain["spec"]["engine"]["name"] == "builtin"
    example = subprocess.run([KUBECTL, "apply", "--dry-run=server", "-n", namespace, "-f",
                              str(Path(__file__).resolve().parents[2] / "examples" / "vllm-r1-distill-32b.yaml")],
                             capture_output=True, text=True, env={**os.environ, "KUBECONFIG": kubeconfig}, timeout=30)
    assert example.returncode == 0, example.stderr


def test_engine_extra_args_that_set_no_flag_of_the_spec_are_accepted(crds, kubeconfig, namespace, api_client):
    """Flags that only look like owned ones (longer names, other dtypes), dotted forms of other flags, values."""
    from kubernetes import client

    extra_args = ["--gpu-memory-utilization", "0.85", "--gpu-memory-utilization=0.85", "--max-num-batched-tokens",
                  "8192", "--enforce-eager", "--model-impl", "transformers", "--kv-cache-dtype", "fp8",
                  "--trust-remote-code", "--max-loras", "2", "--compilation-config.cudagraph_mode",
                  "FULL", "--hf-overrides.max_position_embeddings=8192", "-O3", "-pp", "1", "--seed", "-1"]
    obj = edited(edited(DSD, "spec.engine", {"name": "vllm", "extraArgs": extra_args}), "metadata.name", "extra")
    result = apply(kubeconfig, namespace, obj)
    assert result.returncode == 0, result.stderr
    stored = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "deepseek.ai", "v1alpha1", namespace, "deepseekdeployments", "extra")
    assert stored["spec"]["engine"]["extraArgs"] == extra_args


def test_the_longest_extra_args_stay_within_the_api_servers_cost_budget(crds, kubeconfig, namespace):
    """64 arguments of 1024 characters each (the schema's limits), every one checked against every owned flag."""
    extra_args = [f"--x{i:02d}-" + "k" * 1014 + ".v=1" for i in range(64)]
    obj = edited(edited(DSD, "spec.engine", {"name": "vllm", "extraArgs": extra_args}), "metadata.name", "longest")
    result = apply(kubeconfig, namespace, obj)
    assert result.returncode == 0, result.stderr[:2000]


def test_the_examples_apply_as_the_readme_and_the_gitops_overlay_apply_them(crds, kubeconfig):
    """`kubectl apply -f examples/base/...` (after `kubectl create namespace ai`, as the README says) and the
    kustomize overlay the Argo CD Application syncs pass the API server's validation (server-side dry runs)."""
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    examples = Path(__file__).resolve().parents[2] / "examples"
    created = subprocess.run([KUBECTL, "create", "namespace", "ai"], capture_output=True, text=True, env=env,
                             timeout=30)
    assert created.returncode == 0 or "AlreadyExists" in created.stderr, created.stderr
    for manifest in ("deepseek-llm-7b.yaml", "apikey.yaml"):
        applied = subprocess.run([KUBECTL, "apply", "--dry-run=server", "-f", str(examples / "base" / manifest)],
                                 capture_output=True, text=True, env=env, timeout=30)
        assert applied.returncode == 0, (manifest, applied.stderr)
    prod = examples / "gitops" / "overlays" / "prod"
    overlay = subprocess.run([KUBECTL, "apply", "--dry-run=server", "-k", str(prod)], capture_output=True, text=True,
                             env=env, timeout=30)
    assert overlay.returncode == 0, overlay.stderr
    assert "deepseekdeployment.deepseek.ai/chat" in overlay.stdout and "apikey.deepseek.ai/" in overlay.stdout


@pytest.mark.parametrize(("path", "value", "message"), [
    ("spec.environment", "prod", "environment is immutable"),
    ("spec.deploymentRef.name", "other", "deploymentRef.name is immutable"),
    ("spec.secretName", "renamed", "secretName is immutable"),
])
def test_binding_fields_are_immutable(crds, kubeconfig, namespace, path, value, message):
    assert apply(kubeconfig, namespace, APIKEY).returncode == 0
    result = apply(kubeconfig, namespace, edited(APIKEY, path, value))
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_kubectl_explain_teaches_the_api(crds, kubeconfig):
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    deadline = time.monotonic() + 30
    while True:  # the API server publishes a new CRD's OpenAPI a few seconds after it is Established
        explained = subprocess.run([KUBECTL, "explain", "apikey.spec.gracePeriod"], capture_output=True, text=True,
                                   env=env, timeout=30)
        if explained.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "previous token keeps working after a rotation" in " ".join(explained.stdout.split())
    engine = subprocess.run([KUBECTL, "explain", "dsd.spec.engine"], capture_output=True, text=True, env=env,
                            timeout=30)
    assert "tensor-parallel over the replica's GPUs" in " ".join(engine.stdout.split()), engine.stdout
    listed = subprocess.run([KUBECTL, "get", "deepseek", "-A"], capture_output=True, text=True, env=env, timeout=30)
    assert listed.returncode == 0, listed.stderr
