"""The pure rules of devcluster's process runtime: $(VAR) expansion, resource refs, atomic volume writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devcluster.podnet import pod_mac
from devcluster.processes import expand, resource_value
from devcluster.volumes import VolumeError, downward_value, write_atomically


@pytest.mark.parametrize(("text", "expected"), [
    ("--name=$(NAME)", "--name=web"),
    ("$(NAME)-$(NAME)", "web-web"),
    ("$$(NAME)", "$(NAME)"),          # escaped
    ("$(MISSING)", "$(MISSING)"),      # unknown references stay as written
    ("$(NAME", "$(NAME"),              # unterminated
    ("cost $5 and $$", "cost $5 and $"),
    ("", ""),
])
def test_expand_follows_kubernetes_rules(text: str, expected: str) -> None:
    assert expand(text, {"NAME": "web"}) == expected


def test_resource_field_ref_uses_limit_then_node_allocatable_and_rounds_up() -> None:
    container = {"resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}, "requests": {"cpu": "250m"}}}
    assert resource_value(container, "limits.cpu", None) == "2"
    assert resource_value(container, "limits.cpu", "1m") == "1500"
    assert resource_value(container, "requests.cpu", "0") == "1"  # the API server's default divisor is "0"
    assert resource_value(container, "limits.memory", "1Mi") == "1024"
    assert resource_value({}, "limits.cpu", None) == "64"


def test_downward_values() -> None:
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"b": "2", "a": "1"}},
           "spec": {"nodeName": "gpu-node-1"}, "status": {"podIP": "10.240.0.2"}}
    assert downward_value(pod, "metadata.labels") == 'a="1"\nb="2"'
    assert downward_value(pod, "metadata.labels['b']") == "2"
    assert downward_value(pod, "status.podIP") == "10.240.0.2"
    assert downward_value(pod, "spec.nodeName") == "gpu-node-1"
    with pytest.raises(VolumeError):
        downward_value(pod, "spec.containers")


def test_atomic_writer_swaps_all_files_at_once_and_drops_removed_keys(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    assert write_atomically(target, {"a": (b"1", 0o644), "dir/b": (b"2", 0o600)})
    assert (target / "a").read_bytes() == b"1" and (target / "dir" / "b").read_bytes() == b"2"
    assert os.readlink(target / "a") == "..data/a"
    assert not write_atomically(target, {"a": (b"1", 0o644), "dir/b": (b"2", 0o600)})  # unchanged: no new copy
    first = os.readlink(target / "..data")
    assert write_atomically(target, {"a": (b"new", 0o644)})
    assert (target / "a").read_bytes() == b"new"
    assert not (target / "dir").exists() and not (target / first).exists()
    assert ((target / "a").stat().st_mode & 0o777) == 0o644


def test_pod_mac_is_stable_per_address() -> None:
    assert pod_mac("10.240.0.2") == "0a:58:0a:f0:00:02"
