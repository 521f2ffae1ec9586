"""The generated API reference matches the CRDs (regenerate with `make docs`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_api_reference_is_up_to_date():
    out = subprocess.run([sys.executable, str(REPO / "docs" / "crd_reference.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_api_reference_documents_every_spec_field():
    text = (REPO / "docs" / "api-reference.md").read_text()
    for field in ("spec.model.source.hostPath.path", "spec.rollout.analysis.maxErrorRate", "spec.gracePeriod",
                  "spec.rateLimit.tokensPerMinute"):
        assert f"`{field}`" in text, field
