"""The chart passes the admin's allowed hostPath prefixes to the operator; none by default."""

from __future__ import annotations

from test_chart import helm, render


def _env(*sets: str) -> dict[str, str]:
    dep = next(d for d in render(*sets) if d["kind"] == "Deployment")
    return {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_host_paths_are_refused_by_default_and_allowed_by_prefix():
    assert "DEEPSEEK_OPERATOR_ALLOWED_HOST_PATH_PREFIXES" not in _env()
    env = _env("operator.allowedHostPathPrefixes={/srv/models,/data/llm}")
    assert env["DEEPSEEK_OPERATOR_ALLOWED_HOST_PATH_PREFIXES"] == "/srv/models,/data/llm"


def test_a_relative_prefix_is_rejected_by_the_schema():
    from test_chart import CHART

    result = helm("template", "rel", str(CHART), "--set", "operator.allowedHostPathPrefixes={models}", check=False)
    assert result.returncode != 0 and "allowedHostPathPrefixes" in result.stderr
