"""Writes docs/api-reference.md from the CRD schemas in crds/, so the reference never drifts from the API.

Run: `python docs/crd_reference.py` (or `make docs`); tests/chart/test_docs.py fails when the file is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "crds"
OUT = REPO / "docs" / "api-reference.md"


def _type(schema: dict[str, Any]) -> str:
    kind = schema.get("type", "object")
    if schema.get("x-kubernetes-int-or-string"):
        kind = "int or string"
    if kind == "array":
        kind = f"[]{_type(schema.get('items', {}))}"
    if "enum" in schema:
        kind += " (" + " \\| ".join(f"`{v}`" for v in schema["enum"]) + ")"
    return kind


def _constraints(schema: dict[str, Any]) -> str:
    parts = []
    if "default" in schema:
        parts.append(f"default `{json.dumps(schema['default'])}`")
    for key, label in (("minimum", "≥"), ("maximum", "≤"), ("minLength", "min length"), ("maxLength", "max length"),
                       ("minItems", "min items"), ("maxItems", "max items"), ("pattern", "pattern")):
        if key in schema:
            value = f"`{schema[key]}`" if key == "pattern" else schema[key]
            parts.append(f"{label} {value}")
    for rule in schema.get("x-kubernetes-validations", []):
        parts.append(f"rule: {rule.get('message', rule['rule'])}")
    for rule in schema.get("items", {}).get("x-kubernetes-validations", []):  # each item's rules
        parts.append(f"rule: {rule.get('message', rule['rule'])}")
    return "; ".join(parts)


# Kubernetes types the schema embeds whole: one row each, the fields are Kubernetes' own (`kubectl explain`).
EMBEDDED = {"spec.scheduling.affinity": "dsd.spec.scheduling.affinity"}


def _rows(schema: dict[str, Any], prefix: str, required: set[str]) -> list[str]:
    rows = []
    for name, prop in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        desc = " ".join(str(prop.get("description", "")).split()).replace("|", "\\|")
        if path in EMBEDDED:
            desc += f" Its fields: `kubectl explain {EMBEDDED[path]} --recursive`."
        req = "yes" if name in required else ""
        constraints = _constraints(prop).replace("|", "\\|")
        rows.append(f"| `{path}` | {_type(prop)} | {req} | {desc} | {constraints} |")
        child = prop.get("items", prop) if prop.get("type") == "array" else prop
        if child.get("properties") and path not in EMBEDDED:
            rows += _rows(child, path + ("[]" if prop.get("type") == "array" else ""), set(child.get("required", [])))
    return rows


def render() -> str:
    out = ["# API reference", "",
           "Generated from `crds/` by `docs/crd_reference.py`; do not edit by hand. "
           "`kubectl explain <kind>.spec --recursive` shows the same from a cluster.", ""]
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            names = spec["names"]
            out += [f"## {names['kind']} (`{spec['group']}/{version['name']}`)", "",
                    " ".join(str(schema.get("description", "")).split()), "",
                    f"Short names: {', '.join(names.get('shortNames', [])) or '—'}; "
                    f"categories: {', '.join(names.get('categories', [])) or '—'}; scope: {spec['scope']}.", ""]
            for rule in schema.get("x-kubernetes-validations", []):
                out.append(f"- Rule: {rule.get('message', rule['rule'])}")
            for part in ("spec", "status"):
                sub = schema.get("properties", {}).get(part)
                if not sub:
                    continue
                out += ["", f"### {names['kind']}.{part}", ""]
                for rule in sub.get("x-kubernetes-validations", []):
                    out.append(f"- Rule: {rule.get('message', rule['rule'])}")
                out += ["", "| field | type | required | description | constraints |", "|---|---|---|---|---|"]
                out += _rows(sub, part, set(sub.get("required", [])))
            out.append("")
    return "\n".join(out) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(REPO)} is stale: run `python docs/crd_reference.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
