"""Upgrade from the previous release, on devcluster, the way a user upgrades: the previous release's chart and
operator (checked out of git into a temporary directory; its operator and model server run from that old source)
serve a DeepSeekDeployment with ApiKeys under client traffic, then `helm upgrade` to this working tree's chart swaps
the operator for the new one.

It checks what an upgrade must never do: lose a CRD field (the CRDs follow the chart), break or re-issue a key, start
a rollout by itself, misread the status the old operator wrote, fail a client request, or strand a rollout that was
in progress while the operator was replaced.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from kubernetes import client

from devcluster.cluster import ClusterConfig, DevCluster, default_image_commands
from devcluster.proxy import ServiceProxy
from devcluster.testing.bluegreen import (
    E2E_OPERATOR_ENV,
    GROUP,
    MODEL_NAME,
    REPO,
    SERVER_IMAGE,
    VERSION,
    ContinuousClient,
    World,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1800)]

RELEASE = "deepseek-operator"
OPERATOR_NAMESPACE = "deepseek-system"
CHART = REPO / "charts" / "deepseek-operator"
CRD_NAMES = ("apikeys.deepseek.ai", "deepseekdeployments.deepseek.ai")
# Images devcluster runs from the previous release's source (see `upgrade_cluster`).
PREVIOUS_OPERATOR_IMAGE = "local/previous-release-operator"
PREVIOUS_SERVER_IMAGE = "local/previous-release-server"


@dataclass
class PreviousRelease:
    tag: str
    root: Path  # its charts/, crds/, operator/ and server/

    @property
    def chart(self) -> Path:
        return self.root / "charts" / "deepseek-operator"

    def crd(self, name: str) -> dict[str, Any]:
        return yaml.safe_load((self.root / "crds" / f"{name}.yaml").read_text())


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


# Releases by commit, for clones that carry the history but not the tags (newest first; docs/releasing.md).
RELEASE_COMMITS = {"v0.1.0": "891e1ee7ba5ae16d4e419c4a82f30202dfae65c4"}


def previous_release_tag() -> str:
    """The newest release tag behind HEAD (a tag on HEAD itself only when it is the only one), else the newest
    release commit of RELEASE_COMMITS this clone has."""
    tags = git("tag", "--merged", "HEAD", "--list", "v*", "--sort=-version:refname").split()
    if not tags:
        for commit in RELEASE_COMMITS.values():
            if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                              capture_output=True).returncode == 0:
                return commit
        if git("rev-parse", "--is-shallow-repository").strip() == "true":
            pytest.skip("a shallow clone holds no earlier release to upgrade from: clone with history "
                        "(`git fetch --unshallow --tags`) to run the upgrade test")
        pytest.fail("no release tag (v*) or release commit in this clone's history: `git fetch --tags` "
                    "(docs/releasing.md)")
    head = git("rev-parse", "HEAD").strip()
    older = [tag for tag in tags if git("rev-list", "-n", "1", tag).strip() != head]
    return (older or tags)[0]


@pytest.fixture(scope="module")
def previous_release() -> Iterator[PreviousRelease]:
    tag = previous_release_tag()
    root = Path(tempfile.mkdtemp(prefix=f"deepseek-{tag}-"))
    os.chmod(root, 0o755)  # the operator pod runs as a non-root user
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", tag, "charts", "crds", "operator",
                              "server"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    yield PreviousRelease(tag, root)
    shutil.rmtree(root, ignore_errors=True)


def previous_release_env(release: PreviousRelease) -> str:
    return f"PYTHONPATH={release.root / 'operator'}:{release.root / 'server'}"


@pytest.fixture(scope="module")
def upgrade_cluster(previous_release: PreviousRelease) -> Iterator[DevCluster]:
    """A cluster of its own: devcluster runs the previous release's images from the old source (PYTHONPATH ahead of
    this environment's editable installs), and this tree's images as usual."""
    bin_dir = Path(sys.executable).parent
    old_env = previous_release_env(previous_release)
    commands = {
        f"*{PREVIOUS_OPERATOR_IMAGE}*": ["env", old_env, sys.executable, "-m", "deepseek_operator"],
        f"*{PREVIOUS_SERVER_IMAGE}*": ["env", old_env, str(bin_dir / "deepseek-server")],
        **default_image_commands(),
    }
    with DevCluster(ClusterConfig(name=f"upgrade-{os.getpid()}", image_commands=commands)) as cluster:
        yield cluster


def helm(cluster: DevCluster, *args: str) -> None:
    out = cluster.helm(*args, check=False, timeout=600)
    assert out.returncode == 0, f"helm {args[0]} failed: {out.stderr}"


def helm_values(repository: str, tag: str) -> list[str]:
    chart_env = {"DEEPSEEK_OPERATOR_DRIFT_CHECK_INTERVAL", "DEEPSEEK_OPERATOR_ALLOWED_HOST_PATH_PREFIXES"}
    extra_env = [{"name": k, "value": v} for k, v in E2E_OPERATOR_ENV.items() if k not in chart_env]
    return ["--namespace", OPERATOR_NAMESPACE, "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
            "--set", "operator.logFormat=plain", "--set", "operator.driftCheckInterval=2s",
            "--set-json", f"operator.allowedHostPathPrefixes={json.dumps([tempfile.gettempdir()])}",
            "--set-json", f"operator.extraEnv={json.dumps(extra_env)}",
            "--wait", "--timeout", "5m"]


# ---------------------------------------------------------------------------------------------- CRD fields
def scalar_fields(crd: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    """Scalar fields under `spec` and `status` (through nested objects, not lists), by path, with their schema."""
    def walk(schema: dict[str, Any], path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
        for name, sub in (schema.get("properties") or {}).items():
            if sub.get("type") == "object":
                yield from walk(sub, (*path, name))
            elif sub.get("type") in ("string", "boolean", "integer"):
                yield (*path, name), sub
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    return {path: sub for section in ("spec", "status") for path, sub in walk(root[section], (section,))}


def value_unlike_default(schema: dict[str, Any]) -> Any:
    """A valid value that differs from the schema's default (a defaulted field would appear even when pruned)."""
    default = schema.get("default")
    candidates: list[Any]
    if "enum" in schema:
        candidates = list(schema["enum"])
    elif schema["type"] == "boolean":
        candidates = [True, False]
    elif schema["type"] == "integer":
        low = int(schema.get("minimum", 1))
        candidates = [low, low + 1]
    elif not schema.get("pattern") and not schema.get("format"):
        candidates = ["upgrade-check"]
    else:
        candidates = []
    return next((value for value in candidates if value != default), None)


def with_field(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    body = yaml.safe_load(yaml.safe_dump(body))
    target = body
    for name in path[:-1]:
        target = target.setdefault(name, {})
    target[path[-1]] = value
    return body


def field_of(obj: dict[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        obj = (obj or {}).get(name)
    return obj


class FieldProbe:
    """What the API server would store for a field, asked as a pruning client asks (no strict field validation) and
    as a dry run (nothing is stored): spec fields on a new object, status fields on an existing one's status."""

    PLURALS = {"deepseekdeployments.deepseek.ai": "deepseekdeployments", "apikeys.deepseek.ai": "apikeys"}

    def __init__(self, world: World, existing: dict[str, str]) -> None:
        self.world = world
        self.existing = existing  # CRD name -> an object of that kind whose status is probed
        self.new_objects = {
            "deepseekdeployments.deepseek.ai": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DeepSeekDeployment",
                                                "metadata": {"name": "probe"}, "spec": world.spec()},
            "apikeys.deepseek.ai": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey",
                                    "metadata": {"name": "probe"},
                                    "spec": {"deploymentRef": {"name": "chat"}, "subject": "probe",
                                             "environment": "dev"}},
        }

    def stored(self, crd: str, path: tuple[str, ...], value: Any) -> dict[str, Any] | None:
        """The object as it would be stored with `path` set to `value`; None when it would be refused (a field whose
        siblings a rule requires, say)."""
        custom, plural = self.world.custom, self.PLURALS[crd]
        try:
            if path[0] == "spec":
                return custom.create_namespaced_custom_object(
                    GROUP, VERSION, self.world.namespace, plural, with_field(self.new_objects[crd], path, value),
                    dry_run="All", field_validation="Ignore")
            return custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.world.namespace, plural, self.existing[crd], with_field({}, path, value),
                dry_run="All", field_validation="Ignore")
        except client.ApiException as exc:
            if exc.status == 422:
                return None
            raise


# ---------------------------------------------------------------------------------------------- helpers
def completion(base_url: str, token: str) -> None:
    api = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=60)
    reply = api.chat.completions.create(model=MODEL_NAME, max_tokens=4,
                                        messages=[{"role": "user", "content": "Hello"}])
    assert reply.choices and reply.usage is not None and reply.usage.completion_tokens >= 1


def secret_token(world: World, key: str) -> str:
    secret = world.core.read_namespaced_secret(f"{key}-apikey", world.namespace)
    return base64.b64decode(secret.data["api-key"]).decode()


def apikey_status(world: World, key: str) -> dict[str, Any]:
    apikey = world.custom.get_namespaced_custom_object(GROUP, VERSION, world.namespace, "apikeys", key)
    return apikey.get("status") or {}


def serving_state(world: World, name: str) -> dict[str, Any]:
    """What must not move when nothing asks for a rollout: revisions, Deployments' generations, pod identities."""
    deployments = {d.metadata.name: (d.metadata.generation, d.spec.template.metadata.labels.get("deepseek.ai/revision"))
                   for d in world.apps.list_namespaced_deployment(
                       world.namespace, label_selector=f"deepseek.ai/deployment={name}").items}
    pods = sorted(p.metadata.uid for p in world.core.list_namespaced_pod(
        world.namespace, label_selector=f"deepseek.ai/deployment={name}").items if not p.metadata.deletion_timestamp)
    status = world.status(name)
    ready = world.condition("Ready", name)
    return {"activeColor": status.get("activeColor"), "activeRevision": status.get("activeRevision"),
            "history": status.get("history"), "ready": (ready.get("status"), ready.get("lastTransitionTime")),
            "deployments": deployments, "pods": pods}


def issue_events(world: World, keys: dict[str, str]) -> dict[str, int]:
    return {key: sum(e.count or 1 for reason in ("Issued", "Rotated") for e in world.events(reason, key))
            for key in keys}


def operator_images(cluster: DevCluster) -> list[str]:
    pods = client.CoreV1Api(cluster.api_client()).list_namespaced_pod(OPERATOR_NAMESPACE).items
    return sorted(c.image for p in pods if not p.metadata.deletion_timestamp for c in p.spec.containers)


class OperatorOverlap:
    """Samples the operator pods while an upgrade replaces them: how long a container of the previous release and one
    of the new release ran at the same time (two operators acting at once would both drive rollouts and keys)."""

    def __init__(self, cluster: DevCluster, old_image: str, new_image: str) -> None:
        self.core = client.CoreV1Api(cluster.api_client())
        self.images = (old_image, new_image)
        self.together: list[float] = []  # sample times when both ran
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="operator-overlap", daemon=True)

    def _running(self) -> set[str]:
        running = set()
        for pod in self.core.list_namespaced_pod(OPERATOR_NAMESPACE).items:
            for spec, state in zip(pod.spec.containers, pod.status.container_statuses or [], strict=False):
                if state.state and state.state.running:
                    running.add(spec.image)
        return running

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if set(self.images) <= self._running():
                    self.together.append(time.monotonic())
            except client.ApiException:
                pass  # a missed sample only shortens what is measured
            self._stop.wait(0.2)

    @property
    def seconds(self) -> float:
        return self.together[-1] - self.together[0] if self.together else 0.0

    def __enter__(self) -> OperatorOverlap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# ---------------------------------------------------------------------------------------------- the test
def test_upgrade_from_previous_release_keeps_keys_status_traffic_and_rollouts(
        upgrade_cluster: DevCluster, previous_release: PreviousRelease, tiny_model: Path) -> None:
    cluster, release = upgrade_cluster, previous_release
    # The previous release's code really is what runs as its images.
    where = subprocess.run(["env", previous_release_env(release), sys.executable, "-c",
                            "import deepseek_operator, deepseek_server; "
                            "print(deepseek_operator.__file__); print(deepseek_server.__file__)"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(path).is_relative_to(release.root) for path in where), where

    # 1. The previous release: its chart (CRDs from its crds/ folder), its operator, its model server.
    helm(cluster, "install", RELEASE, str(release.chart), "--create-namespace",
         *helm_values(PREVIOUS_OPERATOR_IMAGE, release.tag))
    assert set(operator_images(cluster)) == {f"{PREVIOUS_OPERATOR_IMAGE}:{release.tag}"}
    api = cluster.api_client()
    namespace = "shop"
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    world = World(api, namespace, tiny_model)
    old_image = f"{PREVIOUS_SERVER_IMAGE}:{release.tag}"
    world.create("chat", image=old_image)
    world.create("moving", image=old_image, rollout={**world.spec()["rollout"], "autoPromote": False})
    for name in ("chat", "moving"):
        world.wait_phase("Completed", name=name, timeout=400)
    tokens = {key: world.create_apikey(key, deployment) for key, deployment in
              (("alice", "chat"), ("bob", "chat"), ("carol", "moving"))}
    keys_before = {key: apikey_status(world, key) for key in tokens}
    issued_before = issue_events(world, tokens)

    # Which fields this tree's CRDs add, and what the previous release's CRDs do with them: a pruning client loses
    # them.
    new_schemas = {name: scalar_fields(yaml.safe_load((REPO / "crds" / f"{name}.yaml").read_text()))
                   for name in CRD_NAMES}
    added = {(name, path): value for name in CRD_NAMES
             for path in sorted(set(new_schemas[name]) - set(scalar_fields(release.crd(name))))
             if (value := value_unlike_default(new_schemas[name][path])) is not None}
    probe = FieldProbe(world, {"deepseekdeployments.deepseek.ai": "chat", "apikeys.deepseek.ai": "alice"})
    for (name, path), value in added.items():
        stored = probe.stored(name, path, value)
        assert stored is None or field_of(stored, path) is None, \
            f"the previous release's CRD {name} kept {'.'.join(path)}: it is not new"

    with ServiceProxy(api, namespace, "chat") as chat_proxy, ServiceProxy(api, namespace, "moving") as moving_proxy:
        chat_url, moving_url = chat_proxy.url + "/v1", moving_proxy.url + "/v1"
        for key, url in (("alice", chat_url), ("bob", chat_url), ("carol", moving_url)):
            completion(url, tokens[key])
        with ContinuousClient(chat_url, tokens["alice"]) as chat_traffic, \
                ContinuousClient(moving_url, tokens["carol"]) as moving_traffic:
            # 2. A rollout in progress while the operator is replaced: the old operator verified it and waits for
            # the promotion.
            world.patch({"spec": {"image": SERVER_IMAGE}}, "moving")
            moving_before = world.status("moving")["activeRevision"]
            awaiting = wait_for("the old operator to verify the new revision of moving", lambda: (
                (rollout := world.status("moving").get("rollout") or {}).get("phase") == "AwaitingPromotion"
                and rollout), 400)
            new_revision = awaiting["revision"]
            assert new_revision != moving_before
            chat_before = serving_state(world, "chat")
            assert chat_before["ready"][0] == "True", chat_before
            started_before = len(world.events("RolloutStarted", "chat"))

            # 3. `helm upgrade` to this tree's chart. Helm refuses to take over CRDs that the previous chart
            # installed from its crds/ folder (they carry no release metadata) ...
            refused = cluster.helm("upgrade", RELEASE, str(CHART), *helm_values("local/deepseek-operator", "dev"),
                                   check=False)
            assert refused.returncode != 0 and "invalid ownership metadata" in refused.stderr, refused.stderr
            assert set(operator_images(cluster)) == {f"{PREVIOUS_OPERATOR_IMAGE}:{release.tag}"}
            # ... until they are handed to the release (the README's upgrade note), then the upgrade goes through.
            cluster.kubectl("label", "crd", *CRD_NAMES, "app.kubernetes.io/managed-by=Helm")
            cluster.kubectl("annotate", "crd", *CRD_NAMES, f"meta.helm.sh/release-name={RELEASE}",
                            f"meta.helm.sh/release-namespace={OPERATOR_NAMESPACE}")
            with OperatorOverlap(cluster, f"{PREVIOUS_OPERATOR_IMAGE}:{release.tag}",
                                 "local/deepseek-operator:dev") as overlap:
                helm(cluster, "upgrade", RELEASE, str(CHART), *helm_values("local/deepseek-operator", "dev"))
                wait_for("only new operator pods",
                         lambda: set(operator_images(cluster)) == {"local/deepseek-operator:dev"}, 180)

            # 4. The new operator finishes the rollout the old one started, once promoted.
            world.annotate("deepseek.ai/promote", new_revision, "moving")
            done = world.wait_phase("Completed", revision=new_revision, name="moving", timeout=400)
            assert done["activeRevision"] == new_revision and done["history"][0]["revision"] == new_revision
            assert done["history"][0]["result"] == "Completed"
            completion(moving_url, tokens["carol"])
            # A few more drift checks of the new operator on the untouched deployment.
            wait_for("the new operator's drift checks", lambda: chat_traffic.ok >= 5 and moving_traffic.ok >= 5, 120)
        assert not chat_traffic.failures, chat_traffic.failures[:5]
        assert not moving_traffic.failures, moving_traffic.failures[:5]

        # 5. Keys: every one still works, with the same token, nothing re-issued.
        for key, url in (("alice", chat_url), ("bob", chat_url), ("carol", moving_url)):
            assert secret_token(world, key) == tokens[key]
            status = apikey_status(world, key)
            assert (status["tokenId"], status["revision"], status["expiresAt"]) == (
                keys_before[key]["tokenId"], keys_before[key]["revision"], keys_before[key]["expiresAt"])
            assert condition_status(status, "Ready") == "True"
            completion(url, tokens[key])
        assert issue_events(world, tokens) == issued_before, "a key was issued again"

    # 6. Status the old operator wrote is read, not rewritten: no rollout of the untouched deployment, its pods are
    # the same pods, and Ready never flipped.
    assert serving_state(world, "chat") == chat_before
    assert len(world.events("RolloutStarted", "chat")) == started_before

    # 7. The CRDs are the chart's now: this tree's crds/, kept on uninstall, and their fields survive a pruning client.
    for name in CRD_NAMES:
        live = json.loads(cluster.kubectl("get", "crd", name, "-o", "json").stdout)
        source = yaml.safe_load((REPO / "crds" / f"{name}.yaml").read_text())
        assert [v["schema"] for v in live["spec"]["versions"]] == [v["schema"] for v in source["spec"]["versions"]]
        assert live["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert live["metadata"]["labels"]["helm.sh/chart"].startswith("deepseek-operator-")
    kept = []
    for (name, path), value in added.items():
        stored = probe.stored(name, path, value)
        if stored is not None:
            assert field_of(stored, path) == value, f"{name} pruned {'.'.join(path)} after the upgrade"
            kept.append(f"{name}:{'.'.join(path)}")
    assert kept or not added, f"no new field could be set after the upgrade: {sorted(added)}"
    # The probe client does prune: a field no CRD knows is dropped (so the fields above were kept by the schema).
    for path in (("spec", "notAField"), ("status", "notAField")):
        stored = probe.stored("deepseekdeployments.deepseek.ai", path, "x")
        assert stored is not None and field_of(stored, path) is None, path
    print(f"upgraded {release.tag} -> working tree; new fields kept after the upgrade: {kept or 'none'}")
    # 8. One operator at a time, also across the upgrade.
    assert not overlap.together, (
        f"the previous release's operator and the new one ran at the same time for {overlap.seconds:.1f} s "
        f"({len(overlap.together)} samples): two operators acted at once")


def condition_status(status: dict[str, Any], type_: str) -> str | None:
    return next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == type_), None)
