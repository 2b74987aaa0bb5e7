"""Configuration: precedence, validation, file formats, and secrets that never print."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from spectranet.streamer.config import load_settings
from spectranet.streamer.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith(("SPECTRANET_", "KAFKA_")):
            monkeypatch.delenv(key)


def test_defaults_are_safe() -> None:
    s = load_settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.kafka.dead_letter_topic == "spectra.dlq"
    assert s.database.url.get_secret_value().startswith("sqlite:///")
    assert s.model.device == "auto"


def test_environment_overrides_file_and_file_overrides_defaults(tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "spectranet.toml"
    cfg.write_text('[kafka]\ngroup_id = "from-file"\ninput_topics = ["a", "b"]\noutput_topic = "from-file-out"\n')
    monkeypatch.setenv("SPECTRANET_KAFKA__OUTPUT_TOPIC", "from-env-out")
    s = load_settings(cfg)
    assert s.kafka.group_id == "from-file"
    assert s.kafka.input_topics == ["a", "b"]
    assert s.kafka.output_topic == "from-env-out"
    assert s.kafka.dead_letter_topic == "a.dlq"


def test_yaml_file_is_accepted_too(tmp_path: Path) -> None:
    cfg = tmp_path / "spectranet.yaml"
    cfg.write_text("batch:\n  max_packets: 7\n")
    assert load_settings(cfg).batch.max_packets == 7


def test_conflicting_topics_raise_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("SPECTRANET_KAFKA__OUTPUT_TOPIC", "spectra")
    with pytest.raises(ConfigError, match="output_topic must differ"):
        load_settings()


@pytest.mark.parametrize("key, value, fragment", [
    ("SPECTRANET_LOG_LEVEL", "LOUD", "log_level"),
    ("SPECTRANET_BATCH__MAX_PACKETS", "many", "max_packets"),
    ("SPECTRANET_KAFKA__AUTO_OFFSET_RESET", "sometimes", "auto_offset_reset"),
    ("SPECTRANET_MODEL__PRECISION", "fp8", "precision"),
])
def test_invalid_values_name_the_setting(monkeypatch, key: str, value: str, fragment: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=fragment):
        load_settings()


def test_unknown_file_keys_are_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[kafka]\nbootstrap_server = 'typo'\n")
    with pytest.raises(ConfigError, match="bootstrap_server"):
        load_settings(cfg)


def test_secrets_never_appear_in_repr_or_logs(monkeypatch, tmp_path: Path, caplog) -> None:
    monkeypatch.setenv("SPECTRANET_DATABASE__URL", "postgresql+psycopg://spectranet:hunter2-db@db/spectranet")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2-kafka")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "daemon")
    s = load_settings()
    assert s.kafka.client_config()["sasl.password"] == "hunter2-kafka"
    assert s.database.url.get_secret_value().endswith("@db/spectranet")
    with caplog.at_level(logging.INFO):
        logging.getLogger("spectranet").info("starting with %r", s)
        logging.getLogger("spectranet").info("settings %s", s)
    text = caplog.text + repr(s) + str(s)
    assert "hunter2" not in text
    assert "**********" in text


def test_database_url_from_a_file(tmp_path: Path, monkeypatch) -> None:
    secret = tmp_path / "db-url"
    secret.write_text("postgresql+psycopg://u:p@h/d\n")
    monkeypatch.setenv("SPECTRANET_DATABASE__URL_FILE", str(secret))
    assert load_settings().database.url.get_secret_value() == "postgresql+psycopg://u:p@h/d"


@pytest.mark.parametrize(("section", "old", "new"), [("batch", "max_size", "max_packets"),
                                                      ("model", "max_batch_size", "max_forward_batch"),
                                                      ("model", "cpu_batch_size", "cpu_forward_batch")])
def test_renamed_keys_still_work_with_a_deprecation_warning(tmp_path, section, old, new) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{section}:\n  {old}: 7\n")
    with pytest.warns(DeprecationWarning, match=f"{section}.{old} is deprecated"):
        settings = load_settings(cfg)
    assert getattr(getattr(settings, section), new) == 7


def test_old_and_new_key_together_is_an_error(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch:\n  max_size: 7\n  max_packets: 8\n")
    with pytest.raises(ConfigError, match="both max_size"), pytest.warns(DeprecationWarning):
        load_settings(cfg)
