"""Server settings from flags, environment (BRIGHTRUN_*) and an optional TOML file.

Precedence: explicit values (CLI flags) > environment > file > defaults. The
defaults are the embedded setup: SQLite under the data dir, the local executor,
artifacts on the filesystem.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from brightrun_server.executors.providers import MarketConfig


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BRIGHTRUN_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    data_dir: Path = Path("~/.brightrun")
    #: sqlite:///path or postgresql://...; defaults to SQLite in the data dir.
    database_url: str | None = None
    #: Jobs that may run at once on this server (the local executor's slots).
    max_concurrent_jobs: int = Field(3, ge=1, le=256)
    #: Seconds between SIGTERM and SIGKILL when stopping a trainer.
    stop_grace_seconds: float = Field(30.0, gt=0, le=600)
    #: Address trainers use to reach this server; defaults to host:port.
    advertise_address: str | None = None
    #: Python interpreter that runs trainers.
    trainer_python: str = sys.executable
    #: torch threads per trainer; None leaves torch's default.
    trainer_threads: int | None = Field(None, ge=1)
    heartbeat_seconds: float = Field(5.0, gt=0, le=300)
    #: Address-space limit for each trainer process (RLIMIT_AS), standing in for
    #: device memory on a host without a GPU; None means no limit.
    trainer_memory_limit_bytes: int | None = Field(None, gt=0)
    #: A training job with no step for this long, or a trainer silent for this
    #: long, is stopped and recovered as a stall.
    stall_seconds: float = Field(900.0, gt=0)
    #: A simulated spot market to run jobs in (pool "simulated-cloud"); see
    #: executors/providers.py MarketConfig. It becomes the default pool.
    simulated_cloud: MarketConfig | None = None
    #: The pool new jobs run in; defaults to simulated-cloud when configured, else local.
    default_pool: str | None = None
    #: Seconds between provisioning attempts, and how many before asking the user.
    provisioning_retry_seconds: float = Field(300.0, gt=0)
    provisioning_max_attempts: int = Field(12, ge=1, le=1000)
    #: Share the listening port with other replicas (SO_REUSEPORT).
    reuse_port: bool = False
    #: A replica silent this long is presumed dead; another takes over its workers.
    replica_timeout_seconds: float = Field(10.0, gt=0)
    #: Time added to each expected start for acquiring and starting a worker.
    provisioning_buffer_seconds: float = Field(300.0, ge=0)
    #: Expected duration of a job without an estimate, for queue planning.
    default_job_duration_seconds: float = Field(3600.0, gt=0)
    #: GPU hours per calendar month by project; projects not listed get the default.
    project_quotas: dict[str, float] = Field(default_factory=dict)
    default_quota_gpu_hours: float | None = Field(None, gt=0)
    #: Default recovery policy (jobs may override each field).
    max_system_retries: int = Field(3, ge=0, le=10)
    initial_backoff_seconds: float = Field(2.0, ge=0.1, le=3600)
    max_backoff_seconds: float = Field(300.0, ge=0.1, le=86400)
    #: Largest dataset upload accepted, in bytes.
    max_upload_bytes: int = Field(10 * 1024**3, gt=0)
    #: Log dataset text and prompts; off by default.
    debug_log_data: bool = False
    log_level: str = "INFO"
    #: An admin key for the default project (brk_<12>_<40>), created or
    #: re-hashed on start; for provisioning. Without it, a store with no keys
    #: gets a fresh admin key in <data dir>/admin-api-key.
    bootstrap_api_key: SecretStr | None = None
    #: Calls a second per API key, sustained, and the burst allowed above it;
    #: 0 turns the limit off.
    rate_limit_per_second: float = Field(100.0, ge=0)
    rate_limit_burst: int = Field(200, ge=1)
    #: TLS: the server's certificate (PEM, with any intermediates after it) and
    #: its private key. Both or neither; without them the port is plaintext.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: Mutual TLS: every client on the port must present a certificate signed by
    #: this CA (PEM) — SDK, CLI and trainers alike, so set trainer_tls_cert_file
    #: and trainer_tls_key_file too.
    tls_client_ca_file: Path | None = None
    #: The client certificate and key trainers present to this server (mutual TLS).
    trainer_tls_cert_file: Path | None = None
    trainer_tls_key_file: Path | None = None
    #: The CA (PEM) trainers verify this server's certificate with; defaults to
    #: tls_cert_file, which works for a self-signed certificate. Trainers connect
    #: to advertise_address (default host:port), so the certificate must name it.
    trainer_tls_ca_file: Path | None = None
    #: Largest message the server receives or sends, in bytes; a larger request
    #: gets RESOURCE_EXHAUSTED. At least 2 MiB: the SDK uploads 1 MiB chunks.
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=2 * 1024 * 1024, le=2**31 - 1)
    #: Open streams (metrics, events, watch — together) one job may have at a
    #: time; one more gets RESOURCE_EXHAUSTED / TOO_MANY_SUBSCRIBERS.
    max_subscribers_per_job: int = Field(1000, ge=1, le=1_000_000)
    #: Dataset bytes each project may store (deleted datasets do not count);
    #: None means unlimited.
    project_storage_bytes: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set tls_cert_file and tls_key_file together")
        if (self.trainer_tls_cert_file is None) != (self.trainer_tls_key_file is None):
            raise ValueError("set trainer_tls_cert_file and trainer_tls_key_file together")
        tls_only = ("tls_client_ca_file", "trainer_tls_cert_file", "trainer_tls_ca_file")
        if self.tls_cert_file is None and any(getattr(self, name) is not None for name in tls_only):
            raise ValueError(f"{', '.join(tls_only)} need TLS: set tls_cert_file and tls_key_file")
        if self.tls_client_ca_file is not None and self.trainer_tls_cert_file is None:
            raise ValueError(
                "with tls_client_ca_file every client must present a certificate, trainers too: "
                "set trainer_tls_cert_file and trainer_tls_key_file"
            )
        return self

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'brightrun.db'}"

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> ServerSettings:
        """Settings from `overrides` > environment > `config_file` > defaults."""
        explicit = {k: v for k, v in overrides.items() if v is not None}
        if config_file is None:
            return cls(**explicit)
        toml_path = config_file

        class _FromFile(cls):  # type: ignore[valid-type, misc]
            @classmethod
            def settings_customise_sources(
                cls,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                return (
                    init_settings,
                    env_settings,
                    TomlConfigSettingsSource(settings_cls, toml_path),
                )

        return cls.model_validate(_FromFile(**explicit).model_dump())
