"""What a user does with the chart before any cluster exists: render it, read its text."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from devcluster import build

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "deepseek-operator"
PRODUCT_TEXT = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted(CHART.rglob("*.yaml")),
                *sorted(CHART.rglob("*.tpl")), *sorted(CHART.rglob("*.txt")), *sorted((REPO / "crds").glob("*.yaml")),
                *sorted((REPO / "examples").rglob("*.yaml"))]
# Code and its docstrings too, where "the seed" alone is a sampling seed: only the possessive and named documents.
PRODUCT_CODE = [path for folder in ("operator", "server", "devcluster", "bench") for path in
                sorted((REPO / folder).rglob("*.py"))]


def test_helm_template_renders_without_a_cluster_or_an_explicit_kube_version():
    binary = build.binary("helm")
    if not binary.exists():
        pytest.fail("helm is not built: run `python -m devcluster build` (make test does)")
    out = subprocess.run([str(binary), "template", "rel", str(CHART)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kind: Deployment" in out.stdout


def test_product_text_names_things_for_what_they_are_not_where_they_came_from():
    origin = re.compile(r"\bthe seed'?s?\b|\bseed (article|guide)\b", re.IGNORECASE)
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in PRODUCT_TEXT for number, line in enumerate(path.read_text().splitlines(), 1)
             if origin.search(line)]
    code_origin = re.compile(r"\bseed's\b|\bseed (article|guide|table|material|document)s?\b", re.IGNORECASE)
    found += [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
              for path in PRODUCT_CODE for number, line in enumerate(path.read_text().splitlines(), 1)
              if code_origin.search(line)]
    assert not found, "\n".join(found)
