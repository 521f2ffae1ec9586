"""Operator settings: from environment variables `DEEPSEEK_OPERATOR_*`, overridable on the command line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .durations import parse_duration
from .leader_election import LeaderElectionConfig, in_cluster_namespace, liveness_address
from .signing_keys import RotationPolicy

ENV_PREFIX = "DEEPSEEK_OPERATOR_"
OUT_OF_CLUSTER_SIGNING_KEY_NAMESPACE = "deepseek-operator"
DURATION_SETTINGS = {
    "signing_key_rotation", "signing_key_propagation", "signing_key_retire_margin", "drift_check_interval",
    "secret_resync_interval",
    "retry_interval", "issuer_check_interval",
    "leader_election_lease_duration", "leader_election_renew_deadline", "leader_election_retry_period",
}


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the operator can be told; durations in seconds (env and CLI accept `30s`, `72h`, ...)."""

    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    liveness_endpoint: str | None = "http://0.0.0.0:8080/healthz"
    log_format: str = "json"
    verbose: bool = False
    workers: int = 16
    kubeconfig: str | None = None
    # A signing key signs for this long, is published this long before it signs, and stays published at least
    # this long after it stopped signing (covers the operator's own short-lived verification tokens).
    signing_key_rotation: float = 30 * 24 * 3600.0
    signing_key_propagation: float = 60.0
    signing_key_retire_margin: float = 900.0
    # How often a key's Secret is read to check it for deletion or tampering when the Secret watch cannot run (no
    # list/watch permission), stretched so that all keys together take at most `drift_checks_per_second` reads.
    drift_check_interval: float = 300.0
    drift_checks_per_second: float = 2.0
    # With the Secret watch running, a change wakes its key at once: a key's Secret is then read on a timer only
    # this rarely (a safety resync), within the same per-second budget.
    secret_resync_interval: float = 24 * 3600.0
    issuer_check_interval: float = 60.0
    # How soon a key waiting for its deployment (or anything that failed) is tried again.
    retry_interval: float = 5.0
    # Where a DeepSeekDeployment may mount model weights from a node's filesystem (host_paths.py); none by default.
    allowed_host_path_prefixes: tuple[str, ...] = ()
    # Where the private signing keys are kept (only the operator reads that namespace): the pod's own namespace in a
    # cluster, else OUT_OF_CLUSTER_SIGNING_KEY_NAMESPACE (created at startup if missing).
    signing_key_namespace: str | None = None
    # Several replicas: only the holder of this Lease reconciles (leader_election.py); the others stand by.
    # Namespace default: the pod's own (in a cluster). Timings as client-go's defaults.
    leader_election: bool = False
    leader_election_namespace: str | None = None
    leader_election_lease_name: str = "deepseek-operator"
    leader_election_lease_duration: float = 15.0
    leader_election_renew_deadline: float = 10.0
    leader_election_retry_period: float = 2.0

    @property
    def key_namespace(self) -> str:
        """The namespace of the signing-key Secrets (see `signing_key_namespace`)."""
        return self.signing_key_namespace or in_cluster_namespace() or OUT_OF_CLUSTER_SIGNING_KEY_NAMESPACE

    @property
    def rotation_policy(self) -> RotationPolicy:
        return RotationPolicy(
            rotation_interval=self.signing_key_rotation,
            propagation_delay=self.signing_key_propagation,
            retire_margin=self.signing_key_retire_margin,
        )

    def validate(self) -> None:
        """Raise ValueError with an actionable message for a settings combination that cannot work."""
        if not self.all_namespaces and not self.namespaces:
            raise ValueError("choose a scope: --namespace NS (repeatable) or --all-namespaces "
                             f"(env {ENV_PREFIX}NAMESPACES=a,b or {ENV_PREFIX}ALL_NAMESPACES=true)")
        if self.all_namespaces and self.namespaces:
            raise ValueError("--all-namespaces and --namespace exclude each other")
        if self.log_format not in ("json", "plain"):
            raise ValueError(f"log format {self.log_format!r} is not json or plain")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")
        if self.drift_checks_per_second <= 0:
            raise ValueError(f"drift_checks_per_second must be above 0, not {self.drift_checks_per_second}")
        if self.leader_election:
            self.leader_election_config("validation").validate()
        if self.liveness_endpoint is not None:
            liveness_address(self.liveness_endpoint)

    def leader_election_config(self, identity: str) -> LeaderElectionConfig:
        """The Lease this process competes for; ValueError when no namespace is known for it."""
        namespace = self.leader_election_namespace or in_cluster_namespace()
        if not namespace:
            raise ValueError("leader election needs the Lease's namespace: --leader-election-namespace NS "
                             f"(env {ENV_PREFIX}LEADER_ELECTION_NAMESPACE), or run in a pod")
        return LeaderElectionConfig(
            namespace=namespace, name=self.leader_election_lease_name, identity=identity,
            lease_duration=self.leader_election_lease_duration, renew_deadline=self.leader_election_renew_deadline,
            retry_period=self.leader_election_retry_period,
        )


def _parse(name: str, text: str, current: Any) -> Any:
    if name in DURATION_SETTINGS:
        return parse_duration(text)
    if name == "liveness_endpoint" and text.lower() in ("", "none"):
        return None
    if name in ("namespaces", "allowed_host_path_prefixes"):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={text!r} is not a boolean (true/false)")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    return text or None


def settings_from_env(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """Settings from `DEEPSEEK_OPERATOR_<NAME>` variables (e.g. `DEEPSEEK_OPERATOR_SIGNING_KEY_ROTATION=720h`)."""
    environ = os.environ if environ is None else environ
    settings = OperatorSettings()
    changes: dict[str, Any] = {}
    for item in fields(OperatorSettings):
        key = ENV_PREFIX + item.name.upper()
        if key in environ:
            try:
                changes[item.name] = _parse(item.name, environ[key], getattr(settings, item.name))
            except ValueError as exc:
                raise ValueError(f"{key}={environ[key]!r}: {exc}") from exc
    return replace(settings, **changes)
