"""One release, one version: the chart, its appVersion, the Python distributions and the image tags users copy move
together (docs/releasing.md), and every CRD serves and stores the API version the operator watches."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from deepseek_operator import __version__ as operator_version
from deepseek_operator.names import GROUP, VERSION
from deepseek_server import __version__ as server_version

REPO = Path(__file__).resolve().parents[2]
CHART = yaml.safe_load((REPO / "charts" / "deepseek-operator" / "Chart.yaml").read_text())
SERVER_IMAGE = re.compile(r"ghcr\.io/deepseek-operator/deepseek-server:([0-9A-Za-z.+-]+)")


def test_chart_app_distributions_and_example_images_share_one_version():
    version = CHART["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert CHART["appVersion"] == version
    for pyproject in ("pyproject.toml", "operator/pyproject.toml", "server/pyproject.toml"):
        assert tomllib.loads((REPO / pyproject).read_text())["project"]["version"] == version, pyproject
    assert operator_version == server_version == version
    copied = [REPO / "README.md", *(REPO / "examples").rglob("*.yaml")]
    tags = {(path.relative_to(REPO).as_posix(), tag) for path in copied
            for tag in SERVER_IMAGE.findall(path.read_text())}
    assert tags, "no server image tag found in README.md or examples/"
    assert {tag.removesuffix("-gateway") for _, tag in tags} == {version}, sorted(tags)


def test_every_crd_serves_and_stores_the_version_the_operator_watches():
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert crd["spec"]["group"] == GROUP
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        assert [name for name, v in versions.items() if v["storage"]] == [VERSION], path.name
        assert versions[VERSION]["served"] is True, path.name
