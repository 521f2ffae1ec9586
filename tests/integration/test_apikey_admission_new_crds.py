"""The chart's ApiKey admission policy on an API server that has only just been given the CRDs, as after a first
`helm install` (or a GitOps sync of the chart with keys): creating an ApiKey is answered 503 until the API server has
read the new schema for its admission policies, which it does every 10 s; waiting for the policy waits that out.

A devcluster of its own: the API server must see the CRDs for the first time. The moment it reads the schemas is found
first with a throwaway kind and a policy on it, so that the CRDs are installed right after one reading and are served
well before the next one: the window is then as wide as it gets instead of whatever the timing of the run gives."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from kubernetes import client, config

from devcluster import ClusterConfig, DevCluster
from devcluster.testing.admission import chart_admission_policy, wait_for_apikey_admission_policy
from devcluster.testing.crds import install_crds

SCHEMA_READ_EVERY = 10.0  # seconds between the API server's readings of the published schemas


def phase_group(n: int) -> str:
    return f"phase{n}.devcluster.test"  # a group of its own: the API server reads schemas by group and version


def phase_objects(n: int) -> str:
    """A throwaway namespaced kind `Probe` and a policy that puts a finalizer on each new one."""
    group, name = phase_group(n), f"phase-{n}"
    return f"""
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingAdmissionPolicy
metadata: {{name: {name}}}
spec:
  failurePolicy: Ignore
  reinvocationPolicy: Never
  matchConstraints:
    resourceRules:
      - {{apiGroups: [{group}], apiVersions: ["*"], operations: [CREATE], resources: [probes]}}
  mutations:
    - patchType: JSONPatch
      jsonPatch:
        expression: '[JSONPatch{{op: "add", path: "/metadata/finalizers", value: ["{group}/seen"]}}]'
---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingAdmissionPolicyBinding
metadata: {{name: {name}}}
spec: {{policyName: {name}}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: probes.{group}}}
spec:
  group: {group}
  scope: Namespaced
  names: {{kind: Probe, plural: probes, singular: probe}}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
"""


def schema_reading(custom: client.CustomObjectsApi, kubectl: list[str]) -> float:
    """The monotonic time of one of the API server's schema readings (within 0.1 s): a new throwaway kind is
    answered 503 until the reading after its CRD, then gets the policy's finalizer."""
    for n in range(4):
        subprocess.run([*kubectl, "apply", "-f", "-"], input=phase_objects(n), text=True, check=True,
                       capture_output=True, timeout=60)
        body = {"apiVersion": f"{phase_group(n)}/v1", "kind": "Probe", "metadata": {"name": "probe"}}
        unavailable, deadline = False, time.monotonic() + 3 * SCHEMA_READ_EVERY
        while time.monotonic() < deadline:
            try:
                created = custom.create_namespaced_custom_object(phase_group(n), "v1", "default", "probes", body,
                                                                 dry_run="All")
            except client.ApiException as exc:
                # 404 while the kind is not served yet, 503 while it is but its schema has not been read
                assert exc.status in (404, 503), exc
                unavailable = unavailable or exc.status == 503
            else:
                if created["metadata"].get("finalizers"):
                    if unavailable:
                        return time.monotonic()
                    break  # read before the first probe: the moment is not known; another kind
            time.sleep(0.1)
    raise AssertionError("no 503 -> served transition seen for four new kinds")


def test_waiting_for_the_policy_outlasts_the_api_servers_reading_of_new_crds():
    with DevCluster(ClusterConfig(name=f"admission-{os.getpid()}", nodes=1, gpus_per_node=1)) as cluster:
        kubeconfig = str(cluster.kubeconfig)
        kubectl = [str(Path(sys.executable).with_name("kubectl")), "--kubeconfig", kubeconfig]
        api = config.new_client_from_config(config_file=kubeconfig)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        namespace = "keys"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        subprocess.run([*kubectl, "apply", "-f", "-"], input=chart_admission_policy(namespace), text=True, check=True,
                       capture_output=True, timeout=60)

        reading = schema_reading(custom, kubectl)
        install_crds(kubeconfig)  # both kinds served; the API server reads their schemas at the next reading
        served = time.monotonic()
        unavailable: list[client.ApiException] = []
        wait_for_apikey_admission_policy(custom, namespace, timeout=3 * SCHEMA_READ_EVERY,
                                         on_unavailable=unavailable.append)
        if served - reading < SCHEMA_READ_EVERY - 1:  # served before the next reading: the window was there
            assert unavailable, f"no 503 although the CRDs were served {served - reading:.1f} s after a reading"
            assert all("There can be a delay" in (exc.body or "") for exc in unavailable), unavailable[0].body
        # and once the policy acts, a key is stored with the operator's finalizer
        key = custom.create_namespaced_custom_object("deepseek.ai", "v1alpha1", namespace, "apikeys", {
            "apiVersion": "deepseek.ai/v1alpha1", "kind": "ApiKey", "metadata": {"name": "first"},
            "spec": {"deploymentRef": {"name": "chat"}, "subject": "first", "environment": "dev"}})
        assert key["metadata"]["finalizers"] == ["deepseek.ai/finalizer"]
