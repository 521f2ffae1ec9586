"""`deepseek-operator uninstall-cleanup` (the chart's pre-delete hook) against an in-memory API: keys deleted and
waited for before deployments, nothing deleted while the operator does not run, a clear message naming what is left
at the deadline, nothing but metadata logged."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from deepseek_operator import uninstall_cleanup
from deepseek_operator.__main__ import main as operator_main
from deepseek_operator.kube import APIKEYS, DEEPSEEKDEPLOYMENTS, KubeError, NotFound, Resource
from deepseek_operator.names import FINALIZER
from deepseek_operator.uninstall_cleanup import (
    Leftover,
    UninstallCleanup,
    build_parser,
    describe_all,
    format_seconds,
    operator_state,
)
from deepseek_operator.workloads import DEPLOYMENTS

TOKEN_LIKE = "eyJhbGciOiJFZERTQSJ9.secret"


class FakeApi:
    """Objects by kind; a deleted object with the operator's finalizer goes `finalize_after` looks later (the operator
    revoking its tokens), or never (`finalize_after=None`: no operator running)."""

    def __init__(self, finalize_after: int | None = 1) -> None:
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            APIKEYS.kind: {}, DEEPSEEKDEPLOYMENTS.kind: {}}
        self.finalize_after = finalize_after
        self.calls: list[tuple[str, str, str]] = []
        self.served = True
        self.refuse: int | None = None
        self._countdown: dict[tuple[str, str, str], int] = {}
        # the operator's Deployment as each look finds it (the last one stays): one ready replica unless a test says
        self.operator_looks: list[dict[str, Any] | None] = [{"spec": {"replicas": 1}, "status": {"readyReplicas": 1}}]
        self.refuse_get: int | None = None

    def add(self, resource: Resource, namespace: str, name: str, finalizers: tuple[str, ...] = ()) -> None:
        self.objects[resource.kind][(namespace, name)] = {"metadata": {
            "namespace": namespace, "name": name, "uid": f"uid-{name}", "finalizers": list(finalizers),
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": TOKEN_LIKE}}}

    def list_metadata(self, resource: Resource, namespace: str | None, *, label_selector: str) -> tuple[list, str]:
        self.calls.append(("list", resource.kind, namespace or "*"))
        if self.refuse:
            raise KubeError(self.refuse, "Forbidden", "apikeys is forbidden", "GET", "/apis/...")
        if not self.served:
            raise NotFound(404, "NotFound", "the server could not find the requested resource", "GET", "/apis/...")
        for key, obj in list(self.objects[resource.kind].items()):
            meta = obj["metadata"]
            if not meta.get("deletionTimestamp") or self.finalize_after is None:
                continue
            countdown = self._countdown.setdefault((resource.kind, *key), self.finalize_after)
            if countdown <= 0:
                meta["finalizers"] = [f for f in meta["finalizers"] if f != FINALIZER]
            self._countdown[(resource.kind, *key)] = countdown - 1
            if not meta["finalizers"]:
                del self.objects[resource.kind][key]
        items = [o for (ns, _), o in sorted(self.objects[resource.kind].items()) if namespace in (None, ns)]
        return items, "1"

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        assert resource is DEPLOYMENTS and (namespace, name) == ("ops", "rel-deepseek-operator")
        self.calls.append(("get", resource.kind, namespace))
        if self.refuse_get:
            raise KubeError(self.refuse_get, "Forbidden", "deployments is forbidden", "GET", "/apis/apps/...")
        return self.operator_looks.pop(0) if len(self.operator_looks) > 1 else self.operator_looks[0]

    def delete_collection(self, resource: Resource, namespace: str) -> None:
        self.calls.append(("delete", resource.kind, namespace))
        for key, obj in list(self.objects[resource.kind].items()):
            if key[0] != namespace:
                continue
            if obj["metadata"]["finalizers"]:
                obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
            else:
                del self.objects[resource.kind][key]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def cleanup(api: FakeApi, namespaces: list[str] | None = None,
            timeout: float = 30) -> tuple[UninstallCleanup, FakeClock]:
    clock = FakeClock()
    return UninstallCleanup(api, namespaces, timeout, operator="ops/rel-deepseek-operator", clock=clock,
                            sleep=clock.sleep), clock


def test_keys_are_deleted_and_gone_before_deployments_are_deleted(caplog):
    caplog.set_level(logging.INFO)
    api = FakeApi(finalize_after=2)
    api.add(APIKEYS, "team-a", "alice", (FINALIZER,))
    api.add(APIKEYS, "team-b", "bob", (FINALIZER,))
    api.add(DEEPSEEKDEPLOYMENTS, "team-a", "chat")
    run, clock = cleanup(api)
    assert run.run() is True
    assert api.objects == {APIKEYS.kind: {}, DEEPSEEKDEPLOYMENTS.kind: {}}
    deletes = [c for c in api.calls if c[0] == "delete"]
    # one request per namespace, once: the operator finalizes what it was asked to
    assert deletes == [("delete", "ApiKey", "team-a"), ("delete", "ApiKey", "team-b"),
                       ("delete", "DeepSeekDeployment", "team-a")]
    # the deployments were deleted only after the last key was seen gone
    last_key_look = max(i for i, c in enumerate(api.calls) if c[:2] == ("list", "ApiKey"))
    assert api.calls.index(("delete", "DeepSeekDeployment", "team-a")) > last_key_look
    assert all(scope == "*" for kind, _, scope in (c for c in api.calls if c[0] == "list"))
    assert "deleting 2 ApiKeys (looked in every namespace): team-a/alice, team-b/bob" in caplog.text
    assert "deleting 1 DeepSeekDeployment (looked in every namespace): team-a/chat" in caplog.text
    assert "every ApiKey and DeepSeekDeployment is gone (looked in every namespace)" in caplog.text
    assert TOKEN_LIKE not in caplog.text and clock.now < 30


def test_namespaced_scope_looks_only_in_the_watched_namespaces():
    api = FakeApi()
    api.add(APIKEYS, "team-a", "alice", (FINALIZER,))
    api.add(APIKEYS, "elsewhere", "carol", (FINALIZER,))
    run, _ = cleanup(api, ["team-a"])
    assert run.run() is True
    assert ("elsewhere", "carol") in api.objects[APIKEYS.kind]  # not the operator's: not this hook's either
    assert {c[2] for c in api.calls if c[0] == "list"} == {"team-a"}


def test_keys_the_operator_does_not_finalize_are_named_at_the_deadline(caplog):
    caplog.set_level(logging.INFO)
    api = FakeApi(finalize_after=None)
    api.add(APIKEYS, "team-a", "alice", (FINALIZER,))
    api.add(APIKEYS, "team-a", "dave", (FINALIZER, "example.com/audit"))
    api.add(DEEPSEEKDEPLOYMENTS, "team-a", "chat")
    run, clock = cleanup(api, timeout=15)
    assert run.run() is False
    assert 15 <= clock.now < 17
    assert not [c for c in api.calls if c[1] == "DeepSeekDeployment"], "deployments are left while keys wait"
    message = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelno == logging.ERROR
    assert message.startswith(
        "2 ApiKeys still there after 15s: team-a/alice (Terminating, finalizers: deepseek.ai/finalizer), "
        "team-a/dave (Terminating, finalizers: deepseek.ai/finalizer, example.com/audit). The operator "
        "(ops/rel-deepseek-operator) removes deepseek.ai/finalizer once it has revoked a key's tokens: check that it "
        "runs and what its log says about these keys; finalizers that are not the operator's are removed by whoever "
        "added them. The uninstall stops here, before Helm deletes anything; run helm uninstall again once they are "
        "gone")
    assert "\n" not in message
    assert TOKEN_LIKE not in caplog.text
    # progress while waiting, every 10 s
    assert "waiting for 2 ApiKeys to go (5s left)" in caplog.text


def test_nothing_is_deleted_while_the_operator_does_not_run(caplog):
    """Deleting a key cannot be taken back: with no operator to finalize it, it would stay Terminating and be revoked
    whenever an operator next ran, even if the uninstall were given up. So the hook waits for a ready operator and,
    without one, fails having deleted nothing, naming the keys it left alone."""
    caplog.set_level(logging.INFO)
    api = FakeApi()
    api.operator_looks = [{"spec": {"replicas": 0}, "status": {}}]
    api.add(APIKEYS, "team-a", "alice", (FINALIZER,))
    api.add(DEEPSEEKDEPLOYMENTS, "team-a", "chat")
    run, clock = cleanup(api, timeout=15)
    assert run.run() is False
    assert 15 <= clock.now < 17
    assert not [c for c in api.calls if c[0] == "delete"]
    assert not api.objects[APIKEYS.kind][("team-a", "alice")]["metadata"].get("deletionTimestamp")
    message = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelno == logging.ERROR and "\n" not in message
    assert message.startswith(
        "the operator ops/rel-deepseek-operator is not running (scaled to zero) after 15s: nothing was deleted, "
        "since every ApiKey deleted now would stay Terminating under deepseek.ai/finalizer until an operator revokes "
        "its tokens, even if the uninstall were then given up; the 1 ApiKey in scope is left as it is: team-a/alice. "
        "Start it (kubectl scale deployment rel-deepseek-operator -n ops --replicas=1) and run helm uninstall again")
    assert "waiting for the operator ops/rel-deepseek-operator to run (scaled to zero; 5s left) before deleting " \
           "anything" in caplog.text
    assert TOKEN_LIKE not in caplog.text


def test_an_operator_that_becomes_ready_within_the_timeout_is_waited_for():
    api = FakeApi()
    starting = {"spec": {"replicas": 1}, "status": {"replicas": 1}}
    api.operator_looks = [starting, starting, starting, {"spec": {"replicas": 1}, "status": {"readyReplicas": 1}}]
    api.add(APIKEYS, "team-a", "alice", (FINALIZER,))
    run, clock = cleanup(api, timeout=30)
    assert run.run() is True
    assert api.objects[APIKEYS.kind] == {}
    first_delete = api.calls.index(("delete", "ApiKey", "team-a"))
    assert [c[0] for c in api.calls[:first_delete]].count("get") == 4 and clock.now >= 3


def test_a_missing_operator_or_no_right_to_read_it_fails_at_once_deleting_nothing(caplog):
    api = FakeApi()
    api.operator_looks = [None]
    api.add(APIKEYS, "team-a", "alice", (FINALIZER,))
    run, clock = cleanup(api)
    assert run.run() is False and clock.now == 0
    assert "the operator ops/rel-deepseek-operator is not running (its Deployment does not exist): nothing was " \
           "deleted" in caplog.text
    api = FakeApi()
    api.refuse_get = 403
    api.add(APIKEYS, "team-a", "alice", (FINALIZER,))
    run, clock = cleanup(api)
    assert run.run() is False and clock.now == 0
    assert "refused to read the operator's Deployment ops/rel-deepseek-operator" in caplog.text
    assert not [c for c in api.calls if c[0] == "delete"]


def test_operator_state_reads_the_deployment():
    assert operator_state({"spec": {"replicas": 2}, "status": {"readyReplicas": 1}}) == (True,
                                                                                          "1 of 2 replica(s) ready")
    assert operator_state({"spec": {"replicas": 1}, "status": {}}) == (False, "0 of 1 replica(s) ready")
    assert operator_state({"spec": {"replicas": 0}}) == (False, "scaled to zero")
    assert operator_state(None) == (False, "its Deployment does not exist")


def test_the_operator_reference_is_namespace_slash_name(capsys):
    parser = build_parser()
    assert parser.parse_args(["-A", "--operator", "ops/rel"]).operator == "ops/rel"
    for bad in ("rel", "ops/", "/rel", "ops/rel/x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["-A", "--operator", bad])
        assert "expected NAMESPACE/DEPLOYMENT" in capsys.readouterr().err


def test_without_an_operator_named_nothing_is_checked():
    api = FakeApi()
    api.operator_looks = [None]
    api.add(APIKEYS, "team-a", "alice", (FINALIZER,))
    clock = FakeClock()
    assert UninstallCleanup(api, None, 30, clock=clock, sleep=clock.sleep).run() is True
    assert not [c for c in api.calls if c[0] == "get"]


def test_a_key_created_again_while_waiting_is_deleted_again():
    api = FakeApi(finalize_after=1)
    api.add(APIKEYS, "team-a", "alice", (FINALIZER,))
    run, _ = cleanup(api)
    original = api.list_metadata

    def recreating(resource: Resource, namespace: str | None, *, label_selector: str) -> tuple[list, str]:
        listed = original(resource, namespace, label_selector=label_selector)
        if resource is APIKEYS and not listed[0] and api.calls.count(("delete", "ApiKey", "team-a")) == 1:
            api.add(APIKEYS, "team-a", "alice", (FINALIZER,))  # a GitOps sync puts it back once
            return original(resource, namespace, label_selector=label_selector)
        return listed

    api.list_metadata = recreating  # type: ignore[method-assign]
    assert run.run() is True
    assert api.calls.count(("delete", "ApiKey", "team-a")) == 2


def test_kinds_not_served_are_nothing_to_delete():
    api = FakeApi()
    api.served = False
    run, _ = cleanup(api)
    assert run.run() is True
    assert not [c for c in api.calls if c[0] == "delete"]


def test_refused_by_rbac_fails_at_once_saying_so(caplog):
    api = FakeApi()
    api.refuse = 403
    run, clock = cleanup(api, ["team-a"])
    assert run.run() is False and clock.now == 0
    assert "refused to list apikeys in namespace team-a (GET /apis/...: 403 Forbidden" in caplog.text
    assert "the hook's RBAC must allow list and deletecollection" in caplog.text


def test_descriptions_are_short():
    objects = [Leftover("ns", f"k{i}", (), False) for i in range(12)]
    assert describe_all(objects, at_most=2) == "ns/k0, ns/k1, and 10 more"
    assert Leftover("ns", "k", (), True).describe() == "ns/k (Terminating)"
    assert [format_seconds(s) for s in (5, 60, 150, 180.4)] == ["5s", "1m", "2m30s", "3m"]


def test_operator_cli_dispatches_the_subcommand(capsys):
    with pytest.raises(SystemExit) as exited:
        operator_main([uninstall_cleanup.COMMAND])
    assert exited.value.code == 2
    assert "one of the arguments --namespace/-n --all-namespaces/-A is required" in capsys.readouterr().err
