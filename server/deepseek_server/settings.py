"""Server settings: every field is a `serve` flag and an environment variable `DEEPSEEK_<FIELD>`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPSEEK_", extra="ignore")

    engine: Literal["builtin", "vllm"] = Field(
        "builtin", description="builtin: load --model in this process; vllm: relay to vLLM's OpenAI server at "
        "--engine-url (this process is then only the gateway and needs no torch)")
    engine_url: str = Field("http://127.0.0.1:8001", description="base URL of the vLLM server (--engine vllm)")
    engine_connect_timeout_s: float = Field(1.0, gt=0, description="connect timeout to the engine; an engine that "
                                            "does not accept within it is answered as 503")
    engine_read_timeout_s: float = Field(600.0, gt=0, description="longest wait for the engine's next bytes")
    model: str | None = Field(None, description="path of the model directory (config.json, weights, tokenizer); "
                              "not used with --engine vllm")
    model_name: str | None = Field(None, description="the id clients send as `model` (default: the directory name; "
                                   "with --engine vllm it must equal vLLM's --served-model-name)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    precision: Literal["bf16", "fp16", "fp32", "int8"] = "bf16"
    device: str = Field("auto", description="auto (every visible GPU, else the CPU), cpu, cuda (every visible "
                        "GPU, the model sharded across them) or cuda:N (that GPU only)")
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_model_len: int | None = Field(None, ge=16, description="context limit (default: the model's own)")
    max_new_tokens: int = Field(512, ge=1, description="default and ceiling for max_tokens")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000)
    kv_cache_tokens: int | None = Field(None, ge=16, description="KV-cache budget in tokens: requests run together "
                                        "only while (rows) x (longest prompt + max_tokens) fits; it also caps the "
                                        "context length (default: sized from free GPU memory after loading; none "
                                        "on the CPU)")
    max_prefill_tokens: int | None = Field(4096, ge=16, description="prompt tokens prefilled per step: joining "
                                           "requests beyond it wait a step, a longer prompt is prefilled in chunks")
    admission_wait_s: float = Field(30.0, gt=0, description="longest wait for KV-cache room before a request "
                                    "is answered 503 with Retry-After")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: one fewer than the CPUs "
                                      "this process may use, within its CPU limit)")

    auth: Literal["required", "disabled"] = "required"
    auth_dir: Path | None = None
    auth_configmap: str | None = Field(None, description="NAMESPACE/NAME of the operator's auth ConfigMap")

    # Its password, if any, never in a repr (a settings object in a traceback or a debug log)
    redis_url: str | None = Field(None, repr=False)
    redis_timeout_s: float = Field(0.5, gt=0)
    cache_ttl: int = Field(300, ge=1, description="seconds a deterministic response stays cached")
    no_cache: bool = False
    cache_max_entries: int = Field(1024, ge=1)
    deployment: str = Field("", description="NAMESPACE/NAME of the deployment this server belongs to; part of every "
                            "response-cache key, so deployments sharing a Redis never share answers")
    model_revision: str = Field("", description="revision of the weights and serving settings (the operator passes "
                                "the rollout revision); part of every response-cache key, so a new revision never "
                                "serves the previous one's answers")
    record_key: SecretStr | None = Field(None, description="secret (at least 32 characters) that keys the HMACs of "
                                         "requests in audit records, history and response-cache keys; give it "
                                         "through the environment, not the command line (default: a random key "
                                         "per process, so replicas then share no cache entries)")

    audit_log: Path | None = Field(None, description="append audit JSON lines here (default: stdout)")
    audit_prompts: bool = Field(False, description="include a prompt preview in audit records (off: redacted)")
    redact: str = Field("api_key,email,phone,card,national_id", description="comma list of what is masked in "
                        "recorded prompt text (audit, history): api_key (API keys, bearer tokens, JWTs), email, "
                        "phone, card (Luhn-checked card numbers), national_id (e.g. US SSN); 'none' masks nothing")
    history_size: int = Field(100, ge=1, le=10_000)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    shutdown_grace_s: float = Field(30.0, ge=0)
    drain_idle_s: float = Field(2.0, gt=0, le=60, description="on SIGTERM, a keep-alive connection already open is "
                                "closed once it has had no request for this long; a request on it meanwhile is "
                                "answered with 'Connection: close'")
    keep_alive_s: int = Field(75, ge=1, description="idle keep-alive; longer than clients' (httpx: 5 s) so that a "
                              "client never reuses a connection the server is closing")
    log_level: str = "info"

    @field_validator("record_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("the record key must be at least 32 characters (e.g. `openssl rand -base64 32`)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        # The URL may hold a password: the message names the schemes, never the value.
        if value is None:
            return value
        if not value.startswith(REDIS_SCHEMES):
            raise ValueError("must be a redis://, rediss:// or unix:// URL (the value given is not shown: it may "
                             "hold a password)")
        try:
            _ = urlsplit(value).port  # raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError("has a port that is not a number from 0 to 65535 (the value given is not shown: it may "
                             "hold a password)") from None
        return value

    @field_validator("redact")
    @classmethod
    def _known_categories(cls, value: str) -> str:
        from deepseek_server.redaction import parse_categories

        parse_categories(value)
        return value

    @model_validator(mode="after")
    def _one_auth_source(self) -> ServerSettings:
        if self.auth == "required":
            sources = [s for s in (self.auth_dir, self.auth_configmap) if s is not None]
            if len(sources) != 1:
                raise ValueError(
                    "auth is required: give exactly one of --auth-dir DIR or --auth-configmap NAMESPACE/NAME "
                    "(or --auth disabled for a local test server)"
                )
        return self

    @model_validator(mode="after")
    def _engine_needs(self) -> ServerSettings:
        if self.engine == "vllm" and not self.model_name and not self.model:
            raise ValueError("--engine vllm needs --model-name NAME (vLLM's --served-model-name)")
        if not self.engine_url.startswith(("http://", "https://")):
            raise ValueError(f"--engine-url must be an http(s) URL, got {self.engine_url!r}")
        return self

    @property
    def cache_enabled(self) -> bool:
        return not self.no_cache

    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        return Path(self.model).name if self.model else "model"
