"""hostPath model sources only under the prefixes the cluster admin allows (pure)."""

from __future__ import annotations

import pytest
from deepseek_operator.host_paths import host_path_refusal
from deepseek_operator.settings import settings_from_env


def _spec(path: str) -> dict:
    return {"model": {"name": "m", "source": {"hostPath": {"path": path}}}}


def test_host_paths_are_refused_unless_the_admin_allows_a_prefix() -> None:
    refusal = host_path_refusal(_spec("/srv/models/7b"), [])
    assert refusal is not None and "allows no hostPath" in refusal and "pvc" in refusal
    assert host_path_refusal(_spec("/srv/models/7b"), ["/srv/models"]) is None
    assert host_path_refusal(_spec("/srv/models"), ["/srv/models/"]) is None


@pytest.mark.parametrize("path", ["/etc", "/srv/models-other/x", "/srv/models/../../etc/shadow", "relative/path"])
def test_paths_outside_the_allowed_prefixes_are_refused(path: str) -> None:
    refusal = host_path_refusal(_spec(path), ["/srv/models"])
    assert refusal is not None and repr(path) in refusal


def test_other_sources_need_no_allowance() -> None:
    assert host_path_refusal({"model": {"name": "m", "source": {"pvc": {"claimName": "c"}}}}, []) is None
    assert host_path_refusal({"model": {"name": "m"}}, []) is None


def test_the_allowed_prefixes_come_from_the_environment() -> None:
    settings = settings_from_env({"DEEPSEEK_OPERATOR_ALLOWED_HOST_PATH_PREFIXES": "/srv/models, /data/llm"})
    assert settings.allowed_host_path_prefixes == ("/srv/models", "/data/llm")
    assert settings_from_env({}).allowed_host_path_prefixes == ()
