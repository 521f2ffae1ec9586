"""Server settings: every field is a `serve` flag and an environment variable `DEEPSEEK_<FIELD>`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: CPUs - 1)")

    auth: Literal["required", "disabled"] = "required"
    auth_dir: Path | None = None
    auth_configmap: str | None = Field(None, description="NAMESPACE/NAME of the operator's auth ConfigMap")

    redis_url: str | None = None
    redis_timeout_s: float = Field(0.5, gt=0)
    cache_ttl: int = Field(300, ge=1, description="seconds a deterministic response stays cached")
    no_cache: bool = False
    cache_max_entries: int = Field(1024, ge=1)

    audit_log: Path | None = Field(None, description="append audit JSON lines here (default: stdout)")
    audit_prompts: bool = Field(False, description="include a prompt preview in audit records (off: redacted)")
    history_size: int = Field(100, ge=1, le=10_000)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    shutdown_grace_s: float = Field(30.0, ge=0)
    keep_alive_s: int = Field(75, ge=1, description="idle keep-alive; longer than clients' (httpx: 5 s) so that a "
                              "client never reuses a connection the server is closing")
    log_level: str = "info"

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
