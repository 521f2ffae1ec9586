"""The server reads the sharded auth layout the operator writes (docs/auth-contract.md), from a directory and from
ConfigMaps watched through the real kubernetes `Watch` with a fake API: no state until every shard is loaded, a
change to one shard re-parses that shard only, and a revocation in any shard rejects its token."""

from __future__ import annotations

import base64
import gzip
import json
import queue
import time
from pathlib import Path
from typing import Any

from deepseek_operator.auth_config import (
    AuthDocuments,
    Limits,
    RevokeTokens,
    apply_changes,
    build_issuer_config,
    build_layout,
    shard_of,
)
from deepseek_operator.signing_keys import KeyRing, build_jwks, signing_key_from_seed
from deepseek_server.auth.configmap_source import ConfigMapAuthSource
from deepseek_server.auth.directory_source import DirectoryAuthSource
from deepseek_server.auth.documents import AuthState
from fake_watch import FakeResponse
from kubernetes.client import V1ConfigMap, V1ObjectMeta

NOW = int(time.time())
SHARDS = 4


def base_documents(revoked: dict[str, int]) -> AuthDocuments:
    return AuthDocuments(
        config=build_issuer_config(issuer="i", audience="a", default_limits=Limits(10, 20), generation=1),
        jwks=build_jwks(KeyRing((signing_key_from_seed(b"\x01" * 32, created_at=0, sign_from=0),))),
        revoked=revoked, limits={f"uid-{i}": Limits(i + 1, 5).as_document() for i in range(40)})


def write_directory(directory: Path, docs: AuthDocuments, shards: int) -> None:
    """The files of every ConfigMap of the layout side by side (what one projected volume of them mounts)."""
    for stale in directory.glob("*.json*"):
        stale.unlink()
    for data, binary in build_layout(docs, shards).contents:
        for key, text in data.items():
            (directory / key).write_text(text)
        for key, packed in binary.items():
            (directory / key).write_bytes(base64.b64decode(packed))


def test_directory_with_shards_loads_all_and_rereads_only_the_changed_shard(tmp_path: Path) -> None:
    states: list[AuthState] = []
    source = DirectoryAuthSource(tmp_path, states.append)
    revoked = {f"jti-{i}": NOW + 3600 for i in range(50)}
    docs = base_documents(revoked)
    write_directory(tmp_path, docs, SHARDS)
    assert source.load_once()
    state = states[-1]
    assert set(state.revoked) == set(revoked) and state.limits_for("uid-3").rps == 4
    assert state.limits_for("nobody") == state.default_limits
    parsed = {shard: entries for shard, (_, entries) in source._entries.items()}

    # One revocation rewrites one shard's file; only that shard is parsed again.
    later = apply_changes(docs, [RevokeTokens({"jti-late": NOW + 3600})], now=NOW)
    target = shard_of("jti-late", SHARDS)
    layout = build_layout(later, SHARDS)
    for key, packed in {**layout.contents[target + 1][0], **layout.contents[target + 1][1]}.items():
        path = tmp_path / key
        path.write_text(packed) if key.endswith(".json") else path.write_bytes(base64.b64decode(packed))
    assert source.load_once()
    assert "jti-late" in states[-1].revoked and set(revoked) <= set(states[-1].revoked)
    for shard, (_, entries) in source._entries.items():
        assert (entries is parsed[shard]) == (shard != target), f"shard {shard}"

    # A listed shard whose files are missing (not synced yet) keeps the last good state.
    for stale in tmp_path.glob(f"*.{(target + 1) % SHARDS}.json*"):
        stale.unlink()
    count = len(states)
    assert not source.load_once() and len(states) == count




class FakeCoreV1:
    """ConfigMaps by name: GET returns the current one, a watch (field selector by name) streams pushed events."""

    def __init__(self) -> None:
        self.objects: dict[str, V1ConfigMap] = {}
        self.events: dict[str, queue.Queue[bytes | None]] = {}
        self.gets: list[str] = []
        self.version = 0

    def put(self, name: str, data: dict[str, str], binary: dict[str, str], event: bool = True) -> None:
        self.version += 1
        self.objects[name] = V1ConfigMap(metadata=V1ObjectMeta(name=name, resource_version=str(self.version)),
                                         data=data, binary_data=binary or None)
        if event:
            body = {"metadata": {"name": name, "resourceVersion": str(self.version)}, "data": data,
                    "binaryData": binary}
            self._queue(name).put((json.dumps({"type": "MODIFIED", "object": body}) + "\n").encode())

    def _queue(self, name: str) -> queue.Queue[bytes | None]:
        return self.events.setdefault(name, queue.Queue())

    def read_namespaced_config_map(self, name: str, namespace: str) -> V1ConfigMap:
        from kubernetes.client.exceptions import ApiException

        self.gets.append(name)
        if name not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return self.objects[name]

    def list_namespaced_config_map(self, namespace: str, **kwargs: Any) -> FakeResponse:
        """A watch request.

        :return: V1ConfigMapList
        """
        return FakeResponse(self._queue(kwargs["field_selector"].removeprefix("metadata.name=")))

    def close(self) -> None:
        for lines in self.events.values():
            lines.put(None)


def wait_for(predicate: Any, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_configmap_source_follows_the_move_to_shards_and_each_shard() -> None:
    core = FakeCoreV1()
    early = {f"jti-{i}": NOW + 3600 for i in range(30)}
    inline = build_layout(base_documents(early), 0)
    core.put("chat-auth", *inline.contents[0], event=False)
    states: list[AuthState] = []
    source = ConfigMapAuthSource("ns/chat-auth", states.append, core_api_factory=lambda: core, retry_delay_s=0.05)
    source.start()
    try:
        assert wait_for(lambda: len(states) == 1)
        assert set(states[0].revoked) == set(early) and core.gets == ["chat-auth"]

        # The operator moves the entries to shards: shards first, then the index that lists them. One shard is
        # late: the server keeps the inline state until every listed shard is loaded.
        docs = apply_changes(base_documents(early), [RevokeTokens({"jti-moved": NOW + 3600})], now=NOW)
        sharded = build_layout(docs, SHARDS)
        for shard in range(SHARDS - 1):
            core.put(f"chat-auth-{shard}", *sharded.contents[shard + 1], event=False)
        core.put("chat-auth", *sharded.contents[0])
        assert wait_for(lambda: f"chat-auth-{SHARDS - 1}" in core.gets)
        time.sleep(0.2)
        assert len(states) == 1, "a state without one of its shards would forget that shard's revocations"
        core.put(f"chat-auth-{SHARDS - 1}", *sharded.contents[SHARDS], event=False)
        assert wait_for(lambda: len(states) == 2, timeout=10)
        assert set(states[1].revoked) == set(early) | {"jti-moved"}
        assert states[1].limits_for("uid-7").rps == 8

        # A revocation rewrites one shard; the watch on that shard applies it.
        later = apply_changes(docs, [RevokeTokens({"jti-late": NOW + 3600})], now=NOW)
        target = shard_of("jti-late", SHARDS)
        core.put(f"chat-auth-{target}", *build_layout(later, SHARDS).contents[target + 1])
        assert wait_for(lambda: "jti-late" in states[-1].revoked)
        assert set(states[-1].revoked) == set(early) | {"jti-moved", "jti-late"}

        # A shard that does not parse keeps the last good state.
        count = len(states)
        core.put(f"chat-auth-{target}", {f"revoked.{target}.json": "{", f"limits.{target}.json": "{}"}, {})
        bad = gzip.compress(b"[]")
        core.put(f"chat-auth-{(target + 1) % SHARDS}", {}, {
            f"revoked.{(target + 1) % SHARDS}.json.gz": base64.b64encode(bad).decode(),
            f"limits.{(target + 1) % SHARDS}.json": "{}"})
        time.sleep(0.3)
        assert len(states) == count and "jti-late" in states[-1].revoked
    finally:
        core.close()
        source.stop()


def test_a_reader_that_ignores_shards_refuses_the_sharded_index_instead_of_reading_nothing_revoked() -> None:
    import pytest
    from deepseek_server.auth.documents import documents_from_configmap, parse_auth_state

    index = build_layout(base_documents({"jti-1": NOW + 3600}), SHARDS).contents[0]
    docs = documents_from_configmap(*index)
    # A reader of this version takes the entries from the shards only.
    assert dict(parse_auth_state(docs, [{"revoked": {f"jti-{i}": NOW}, "limits": {"profiles": [], "keys": {}}}
                                                        for i in range(SHARDS)]
                                 ).revoked) == {f"jti-{i}": NOW for i in range(SHARDS)}
    # What a server of an earlier version does: it knows no `shards.json`, reads the index as the whole set.
    del docs["shards"]
    with pytest.raises(ValueError, match=r"revoked\.json"):
        parse_auth_state(docs)
