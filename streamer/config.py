"""Typed configuration: defaults < config file (TOML or YAML) < environment variables (``SPECTRANET_...``).

Nested settings use a double underscore in the environment, e.g. ``SPECTRANET_KAFKA__BOOTSTRAP_SERVERS`` or
``SPECTRANET_DATABASE__URL``. Secrets (the database URL, Kafka client passwords) are ``SecretStr`` and never appear
in logs or ``repr``; they can also be read from a file named by ``SPECTRANET_DATABASE__URL_FILE``.
"""

from __future__ import annotations

import logging
import os
import tomllib
import warnings
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from spectranet.streamer.errors import ConfigError

__all__ = ["Settings", "KafkaSettings", "DatabaseSettings", "ModelSettings", "BatchSettings", "MetricsSettings",
           "HealthSettings", "load_settings"]

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("spectranet_config_file", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in the config file is an error, not a silent default

    # Keys renamed in 0.2.0 (old name -> new name): still accepted, with a DeprecationWarning, until 0.3.0.
    _renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _accept_renamed_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls._renamed:
            return data
        data = dict(data)
        for old, new in cls._renamed.items():
            if old in data:
                warnings.warn(f"config key {cls._section_name()}.{old} is deprecated (removed in 0.3.0): use "
                              f"{cls._section_name()}.{new}", DeprecationWarning, stacklevel=2)
                logging.getLogger(__name__).warning("config key %s.%s is deprecated: use %s.%s",
                                                    cls._section_name(), old, cls._section_name(), new)
                if new in data:
                    raise ValueError(f"{cls._section_name()}: both {old} (deprecated) and {new} are set")
                data[new] = data.pop(old)
        return data

    @classmethod
    def _section_name(cls) -> str:
        return cls.__name__.removesuffix("Settings").lower()


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "spectranet"
    group_instance_id: str | None = None         # static membership: a restart within the session keeps partitions
    input_topics: list[str] = ["spectra"]
    output_topic: str = "spectra.annotated"
    dlq_topic: str | None = None                 # default: '<first input topic>.dlq'
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = 10_000
    max_poll_interval_ms: int = 300_000
    output_framing: Literal["schemaless", "confluent"] = "schemaless"
    schema_registry_url: str | None = None       # with output_framing=confluent; bundled ids otherwise
    max_message_bytes: int = 8 * 1024 * 1024
    # Extra librdkafka properties (security.protocol, sasl.*, ssl.*): passed through; values are secrets.
    client_properties: dict[str, SecretStr] = Field(default_factory=dict)

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.input_topics[0]}.dlq"

    def client_config(self) -> dict[str, str]:
        """Properties shared by consumer, producer and admin client (secrets revealed only here)."""
        conf = {"bootstrap.servers": self.bootstrap_servers}
        conf.update({k: v.get_secret_value() for k, v in self.client_properties.items()})
        return conf


class DatabaseSettings(_Section):
    url: SecretStr = SecretStr("sqlite:///spectranet.sqlite")
    url_file: Path | None = None                 # read the URL from this file (a mounted secret) instead
    store_arrays: bool = False                   # keep each packet's original bytes (for reprocessing)
    migrate_on_start: bool = True                # false when the daemon's role may not run DDL (least privilege)

    @model_validator(mode="after")
    def _url_from_file(self) -> "DatabaseSettings":
        if self.url_file is not None:
            try:
                self.url = SecretStr(self.url_file.read_text().strip())
            except OSError as exc:
                raise ValueError(f"database.url_file {self.url_file}: {exc.strerror}") from exc
        return self


class MetricsSettings(_Section):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = 9108                             # /metrics, /healthz, /readyz


class HealthSettings(_Section):
    # /healthz and /readyz answer 503 when consumed packets wait this long without a commit (a stalled stream).
    stall_timeout_s: float = Field(default=120.0, gt=0)


class ModelSettings(_Section):
    path: Path | None = None                     # None: the model shipped in the package
    device: str = "auto"                         # auto | cpu | cuda | cuda:N
    _renamed: ClassVar[dict[str, str]] = {"max_batch_size": "max_forward_batch", "cpu_batch_size": "cpu_forward_batch"}

    max_forward_batch: int = 256                    # per forward pass on GPU (halves on out-of-memory)
    cpu_forward_batch: int = 16                     # per forward pass on CPU, where small batches are faster
    threads: int | None = None                   # torch intra-op threads; None: one per core
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on CUDA, float32 on CPU
    templates: str = ""                          # template bank refining redshifts: "" the shipped one, "none", a path


class BatchSettings(_Section):
    _renamed: ClassVar[dict[str, str]] = {"max_size": "max_packets"}

    max_packets: int = 64                           # close a micro-batch at this many packets ...
    max_wait_s: float = 0.25                     # ... or after this long, whichever comes first (latency bound)
    pipelined: bool = True                       # overlap the next batch's inference with this batch's I/O
    retry_backoff_s: float = 1.0                 # first wait after an infrastructure failure (doubles, capped)
    retry_backoff_max_s: float = 30.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPECTRANET_", env_nested_delimiter="__", extra="forbid")

    kafka: KafkaSettings = KafkaSettings()
    database: DatabaseSettings = DatabaseSettings()
    model: ModelSettings = ModelSettings()
    batch: BatchSettings = BatchSettings()
    metrics: MetricsSettings = MetricsSettings()
    health: HealthSettings = HealthSettings()
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    shutdown_timeout_s: float = 30.0             # SIGTERM: finish, commit and close within this, else exit anyway

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, not {v!r}")
        return v.upper()

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.kafka.output_topic in self.kafka.input_topics:
            raise ValueError("output_topic must differ from the input topics "
                             "(the daemon would classify its own output)")
        if self.kafka.dead_letter_topic in self.kafka.input_topics:
            raise ValueError("dlq_topic must differ from the input topics")
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """The config file (TOML or YAML) given to ``load_settings`` or named by ``SPECTRANET_CONFIG``, and raw
    ``KAFKA_*`` client properties from the environment (``KAFKA_SASL_PASSWORD`` -> ``sasl.password``)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _CONFIG_FILE.get() or os.environ.get("SPECTRANET_CONFIG")
        data: dict[str, Any] = _read_file(Path(path)) if path else {}
        raw = {k[len("KAFKA_"):].lower().replace("_", "."): v for k, v in os.environ.items()
               if k.startswith("KAFKA_") and not k.endswith("_OPTS") and k != "KAFKA_HOME"}  # JVM/broker vars
        if raw:
            kafka = data.setdefault("kafka", {})
            kafka["client_properties"] = {**raw, **kafka.get("client_properties", {})}
        return data


def _read_file(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from defaults, ``config_file`` (or ``SPECTRANET_CONFIG``), the environment, then ``overrides``."""
    token = _CONFIG_FILE.set(Path(config_file) if config_file is not None else None)
    try:
        return Settings(**overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        _CONFIG_FILE.reset(token)
