"""End to end on real services: Kafka-protocol broker in, PostgreSQL and Kafka out.

200 real spectra go through the real daemon; the test then reads the database, the output topic and the committed
offsets independently of the daemon's own bookkeeping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, TopicPartition
from spectranet.streamer.app import build_daemon
from spectranet.streamer.config import load_settings
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.kafka_io import ensure_topics
from spectranet.streamer.tools.files import publish_files

from tests.support.common import DATA, SPECTRUM_FILES
from tests.support.harness import drain, spectrum_ids

pytestmark = pytest.mark.integration

BAD = sorted(str(p) for p in (DATA / "bad_spectra").glob("*.txt"))


def _committed_vs_end(bootstrap: str, group: str, topic: str, partitions: int,
                      **conf: object) -> list[tuple[int, int]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, **conf})
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        committed = consumer.committed(tps, timeout=20)
        return [(c.offset, consumer.get_watermark_offsets(tp, timeout=20)[1]) for c, tp in zip(committed, tps)]
    finally:
        consumer.close()


def test_200_real_spectra_through_kafka_and_postgres(kafka, database_url, topic_prefix) -> None:
    assert len(SPECTRUM_FILES) == 200, "the fixture set is 200 spectra the model's grid covers"
    settings = load_settings(
        kafka={"bootstrap_servers": kafka.bootstrap_servers, "group_id": f"{topic_prefix}-g",
               "input_topics": [f"{topic_prefix}-in"], "output_topic": f"{topic_prefix}-out",
               "session_timeout_ms": 6000},
        database={"url": database_url}, batch={"max_packets": 64, "max_wait_s": 0.5})
    k = settings.kafka
    ensure_topics(k, k.input_topics, partitions=3)
    ensure_topics(k, [k.output_topic, k.dead_letter_topic])
    n, errors = publish_files(SPECTRUM_FILES, topic=k.input_topics[0], bootstrap_servers=kafka.bootstrap_servers)
    assert (n, errors) == (200, [])

    stats = build_daemon(settings, serve_metrics=False).run(max_messages=200, idle_timeout_s=90)
    assert (stats.classified, stats.dead_lettered) == (200, 0)

    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(sa.select(db.classifications.c.spectrum_id))]
        models = conn.execute(sa.select(db.models.c.name, db.models.c.version)).all()
    engine.dispose()
    assert len(ids) == 200 and set(ids) == spectrum_ids(SPECTRUM_FILES)
    assert len(models) == 1

    out = drain(kafka.bootstrap_servers, k.output_topic, 200)
    decoded = [Codec("annotated_spectrum").decode(m.value()) for m in out]
    assert len(decoded) == 200
    assert {a["spectrum_id"] for a in decoded} == set(ids)
    assert all(m.key().decode() == a["object_id"] for m, a in zip(out, decoded))

    for committed, end in _committed_vs_end(kafka.bootstrap_servers, k.group_id, k.input_topics[0], 3):
        assert committed == end > 0


def test_bad_spectra_are_dead_lettered_on_a_real_broker(kafka, database_url, topic_prefix) -> None:
    assert BAD, "tests/data/bad_spectra holds real spectra the model cannot use"
    paths = SPECTRUM_FILES[:10] + BAD
    settings = load_settings(
        kafka={"bootstrap_servers": kafka.bootstrap_servers, "group_id": f"{topic_prefix}-g",
               "input_topics": [f"{topic_prefix}-in"], "output_topic": f"{topic_prefix}-out",
               "session_timeout_ms": 6000},
        database={"url": database_url}, batch={"max_packets": 8, "max_wait_s": 0.5})
    k = settings.kafka
    ensure_topics(k, [*k.input_topics, k.output_topic, k.dead_letter_topic])
    n, _ = publish_files(paths, topic=k.input_topics[0], bootstrap_servers=kafka.bootstrap_servers)
    stats = build_daemon(settings, serve_metrics=False).run(max_messages=n, idle_timeout_s=60)
    assert (stats.classified, stats.dead_lettered) == (10, len(BAD))
    dlq = drain(kafka.bootstrap_servers, k.dead_letter_topic, len(BAD))
    assert len(dlq) == len(BAD)
    for m in dlq:
        headers = dict(m.headers())
        assert headers["spectranet.error.class"].endswith(b"Error")
        assert headers["spectranet.error.field"] == b"wavelength"
        assert headers["spectranet.source.topic"].decode() == k.input_topics[0]
    with sa.create_engine(database_url).connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.dead_letters)).scalar_one() == len(BAD)


def test_cli_smoke_on_tansu(tansu, tmp_path, topic_prefix) -> None:
    """The demo's broker with the user's commands: spectranet produce, then spectranet run, SQLite default."""
    paths = SPECTRUM_FILES[:20]
    env = {**os.environ,
           "SPECTRANET_KAFKA__BOOTSTRAP_SERVERS": tansu.bootstrap_servers,
           "SPECTRANET_KAFKA__GROUP_ID": f"{topic_prefix}-g",
           "SPECTRANET_KAFKA__INPUT_TOPICS": f'["{topic_prefix}-in"]',
           "SPECTRANET_KAFKA__OUTPUT_TOPIC": f"{topic_prefix}-out",
           "SPECTRANET_KAFKA__SESSION_TIMEOUT_MS": "6000", "SPECTRANET_METRICS__PORT": "0",
           "SPECTRANET_DATABASE__URL": f"sqlite:///{tmp_path / 'smoke.sqlite'}"}
    settings = load_settings(kafka={"bootstrap_servers": tansu.bootstrap_servers,
                                    "input_topics": [f"{topic_prefix}-in"], "output_topic": f"{topic_prefix}-out"})
    ensure_topics(settings.kafka, [f"{topic_prefix}-in", f"{topic_prefix}-out", f"{topic_prefix}-in.dlq"])
    cli = [sys.executable, "-m", "spectranet.streamer.cli"]
    subprocess.run([*cli, "produce", *paths, "--topic", f"{topic_prefix}-in",
                    "--bootstrap-servers", tansu.bootstrap_servers], check=True, env=env, timeout=120)
    run = subprocess.run([*cli, "run", "--max-messages", "20", "--idle-timeout", "60"], env=env, timeout=180,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "20 classified, 0 dead-lettered" in run.stdout
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'smoke.sqlite'}")
    with engine.connect() as conn:
        assert set(r[0] for r in conn.execute(sa.select(db.classifications.c.spectrum_id))) == spectrum_ids(paths)
    out = drain(tansu.bootstrap_servers, f"{topic_prefix}-out", 20, **{"session.timeout.ms": 6000})
    assert len(out) == 20
    assert {Codec("annotated_spectrum").decode(m.value())["spectrum_id"] for m in out} == spectrum_ids(paths)


def test_replay_from_a_time_in_a_separate_group(kafka, database_url, topic_prefix) -> None:
    from datetime import datetime, timezone

    settings = load_settings(
        kafka={"bootstrap_servers": kafka.bootstrap_servers, "group_id": f"{topic_prefix}-g",
               "input_topics": [f"{topic_prefix}-in"], "output_topic": f"{topic_prefix}-out",
               "session_timeout_ms": 6000},
        database={"url": database_url}, batch={"max_packets": 16, "max_wait_s": 0.5})
    k = settings.kafka
    ensure_topics(k, [*k.input_topics, k.output_topic, k.dead_letter_topic])
    publish_files(SPECTRUM_FILES[:6], topic=k.input_topics[0], bootstrap_servers=kafka.bootstrap_servers)
    time.sleep(1.0)
    middle = int(datetime.now(timezone.utc).timestamp() * 1000)
    time.sleep(1.0)
    publish_files(SPECTRUM_FILES[6:10], topic=k.input_topics[0], bootstrap_servers=kafka.bootstrap_servers)
    assert build_daemon(settings, serve_metrics=False).run(max_messages=10, idle_timeout_s=60).classified == 10

    replay = load_settings(kafka={**k.model_dump(), "group_id": f"{topic_prefix}-replay"},
                           database={"url": database_url}, batch={"max_packets": 16, "max_wait_s": 0.5})
    stats = build_daemon(replay, serve_metrics=False, start_at_ms=middle).run(idle_timeout_s=8)
    assert stats.classified == 4  # only what was published after `middle`
    with sa.create_engine(database_url).connect() as conn:  # same model: the replay added no rows
        assert conn.execute(sa.select(sa.func.count()).select_from(db.classifications)).scalar_one() == 10
