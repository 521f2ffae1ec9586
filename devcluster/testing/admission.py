"""The chart's ApiKey admission policy (the MutatingAdmissionPolicy that puts the operator's finalizer on new keys) on a
devcluster, for tests and benchmarks: rendered with helm as `helm install` renders it, and waited for until it acts.

The API server gives a mutating admission policy the schema of the kind it patches from the OpenAPI documents it
publishes, which it reads about every 10 s. Until it has read them with a new CRD in, a create of an ApiKey that the
policy matches is answered 503 "Resource kind deepseek.ai/v1alpha1, Kind=ApiKey not found. There can be a delay
between when CustomResourceDefinitions are created and when they are available.": for up to about ten seconds after
the kind is served, however long ago the policy was applied (tests/integration/test_apikey_admission_new_crds.py)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from kubernetes import client

CHART = Path(__file__).resolve().parents[2] / "charts" / "deepseek-operator"
TEMPLATE = "templates/apikey-admission-policy.yaml"
API_VERSION = "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy"
FINALIZER = "deepseek.ai/finalizer"  # deepseek_operator/names.py FINALIZER
GROUP, VERSION = "deepseek.ai", "v1alpha1"


def chart_admission_policy(namespace: str, chart: Path = CHART) -> str:
    """The chart's ApiKey admission policy as `helm install` renders it on an API server that serves
    MutatingAdmissionPolicy, for an operator watching only `namespace`; "" when `chart` has none."""
    if not (chart / TEMPLATE).is_file():
        return ""
    from devcluster import build

    return subprocess.run(
        [str(build.binary("helm")), "template", "rel", str(chart), "--namespace", "ops", "--api-versions",
         API_VERSION, "--set", f"watchNamespaces={{{namespace}}}", "--show-only", TEMPLATE],
        check=True, capture_output=True, text=True, timeout=120).stdout


def wait_for_apikey_admission_policy(custom: client.CustomObjectsApi, namespace: str, timeout: float = 60,
                                     on_unavailable: Callable[[client.ApiException], object] | None = None) -> None:
    """Return once an ApiKey created in `namespace` gets the operator's finalizer from the policy (a server-side dry
    run shows it; nothing is stored). A 503 -- the API server has not read the ApiKey schema for its admission
    policies yet -- is waited out like the policy itself (`on_unavailable(exc)` is called for each); other API errors
    are raised. TimeoutError past `timeout`."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": "admission-probe"},
            "spec": {"deploymentRef": {"name": "probe"}, "subject": "probe", "environment": "dev"}}
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            probe = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys", body, dry_run="All")
        except client.ApiException as exc:
            if exc.status != 503:
                raise
            last = f"503 {exc.reason}"
            if on_unavailable is not None:
                on_unavailable(exc)
        else:
            if FINALIZER in (probe["metadata"].get("finalizers") or []):
                return
            last = "created without the finalizer"
        time.sleep(0.2)
    raise TimeoutError(f"the chart's ApiKey admission policy did not act in namespace {namespace} within "
                       f"{timeout:.0f} s; last probe: {last}")
