"""Fault injection on real services (issue 8, "Faults"): Apache Kafka and PostgreSQL, the real daemon.

One test per scenario. Each counts, independently of the daemon's own bookkeeping: packets sent, rows written, lost
spectra, duplicate result rows (``count(*)`` against ``count(DISTINCT spectrum_id, revision, model)``), annotated
packets on the output topic (total and distinct ``annotation_id``), dead letters and crashes (a daemon process that
exits non-zero or on its own, a daemon thread that raises, a traceback in a daemon's log). The goal asserted
everywhere: 0 lost, 0 duplicate rows, 0 crashes. The output topic is at-least-once: redelivered batches repeat
annotations there, with the same deterministic ``annotation_id``, so subscribers de-duplicate; every expected id
must be present.

Each test appends its counts to a JSON report: ``$SPECTRANET_FAULTS_REPORT`` if set, else
``<pytest basetemp>/faults-report.json`` (docs/reliability.md is transcribed from one). Random choices are seeded.

Run alone with ``pytest -m faults``. Brokers and clusters a test may stop are private to this module; the session's
shared broker and PostgreSQL are never stopped. Every process and client started here is stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fastavro
import psycopg
import pytest
import sqlalchemy as sa
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr
from spectranet.streamer.app import build_daemon
from spectranet.streamer.config import Settings
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.kafka_io import ensure_topics
from sqlalchemy.engine import make_url

from tests.support.common import ServiceUnavailable
from tests.support.harness import (
    CODEC,
    NEWER_MINOR,
    Assignments,
    DaemonProcess,
    DaemonThread,
    Packet,
    Results,
    Setup,
    annotation_ids,
    bad_packet,
    base_packets,
    drain,
    evolved_schema,
    expected_annotation_ids,
    good_packets,
    produce,
    variant,
    wait_until,
)
from tests.support.kafka import RestartableKafka
from tests.support.postgres import create_database, drop_database, start_local_postgres

pytestmark = [pytest.mark.integration, pytest.mark.faults]


# --------------------------------------------------------------------------------------------------- counting


@dataclass
class Tally:
    """What one scenario did, as reported in docs/reliability.md."""

    scenario: str
    packets_sent: int = 0
    expected_classified: int = 0
    rows: int = 0
    lost: int = 0
    duplicate_rows: int = 0
    annotations_total: int = 0
    annotations_distinct: int = 0
    annotations_missing: int = 0
    dead_letters: int = 0
    crashes: int = 0
    seconds: float = 0.0
    faults: dict[str, Any] = field(default_factory=dict)  # what was injected, how often


class Report:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []

    def add(self, tally: Tally) -> None:
        self.entries.append(asdict(tally))
        self.path.write_text(json.dumps({"written_at": datetime.now(timezone.utc).isoformat(),
                                         "machine": f"{os.uname().nodename}, {os.cpu_count()} cores",
                                         "scenarios": self.entries}, indent=2))
        print(f"\n[faults] {json.dumps(asdict(tally))}")


@pytest.fixture(scope="session")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    path = Path(os.environ.get("SPECTRANET_FAULTS_REPORT") or tmp_path_factory.getbasetemp() / "faults-report.json")
    return Report(path)


def count(tally: Tally, setup: Setup, results: Results, classified: list[Packet]) -> Tally:
    """Fill ``tally`` from the database and the output topic; ``classified`` are the packets that must have rows."""
    c = db.classifications.c
    with results.engine.connect() as conn:
        total, distinct = conn.execute(sa.select(
            sa.func.count(),
            sa.func.count(sa.distinct(sa.tuple_(c.spectrum_id, c.revision, c.model_name, c.model_version))),
        )).one()
        found = set(conn.execute(sa.select(c.spectrum_id)).scalars())
    tally.expected_classified = len(classified)
    tally.rows, tally.duplicate_rows = total, total - distinct
    tally.lost = len({p.spectrum_id for p in classified} - found)
    tally.dead_letters = results.count(db.dead_letters)
    ids = annotation_ids(drain(setup.bootstrap, setup.output_topic, len(classified), timeout_s=60))
    tally.annotations_total, tally.annotations_distinct = len(ids), len(set(ids))
    tally.annotations_missing = len(expected_annotation_ids(classified) - set(ids))
    return tally


def assert_goal(tally: Tally) -> None:
    assert (tally.lost, tally.duplicate_rows, tally.crashes, tally.annotations_missing) == (0, 0, 0, 0), tally
    assert tally.rows == tally.expected_classified, tally


def daemon_log_crashes(*logs: str) -> int:
    return sum(log.count("Traceback") for log in logs)


def thread_crashes(*workers: DaemonThread) -> int:
    return sum(w.error is not None or (w.thread.is_alive() is False and w.stats is None) for w in workers)


class PacedProducer:
    """Publishes ``packets`` at about ``rate`` per second from a thread; ``join`` flushes and checks every report."""

    def __init__(self, bootstrap: str, topic: str, packets: list[Packet], *, rate: float) -> None:
        self.packets, self.rate, self.topic = packets, rate, topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20,
                                  "compression.type": "lz4"})
        self.delivered = 0
        self.failed: list[str] = []
        self.thread = threading.Thread(target=self._run, name="paced-producer", daemon=True)

    def _report(self, err: Any, _msg: Any) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed.append(str(err))

    def _run(self) -> None:
        started = time.monotonic()
        for i, pkt in enumerate(self.packets):
            self.producer.produce(self.topic, key=pkt.key, value=pkt.value, on_delivery=self._report)
            self.producer.poll(0)
            pause = started + (i + 1) / self.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)

    def __enter__(self) -> "PacedProducer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=300)
        self.producer.flush(120)

    def join(self) -> None:
        self.__exit__()
        assert not self.failed and self.delivered == len(self.packets), (self.delivered, self.failed[:3])


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def private_kafka() -> Iterator[RestartableKafka]:
    """An Apache Kafka broker of this module alone: it may be stopped, and it never creates topics on its own."""
    try:
        broker = RestartableKafka(extra_properties=("auto.create.topics.enable=false",))
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield broker
    finally:
        broker.close()


def _with_client_properties(settings: Settings, **properties: str) -> Settings:
    settings.kafka.client_properties.update({k.replace("_", "."): SecretStr(v) for k, v in properties.items()})
    return settings


# --------------------------------------------------------------------------------------------------- 1: SIGKILL


def test_sigkill_a_consumer_repeatedly_while_another_keeps_going(setup: Setup, report: Report,
                                                                 tmp_path: Path) -> None:
    rng = random.Random(81)
    tally = Tally("SIGKILL of a consumer, 4 times at random points, a second consumer keeps going")
    started = time.monotonic()
    setup.partitions = 4
    setup.create_topics()
    packets = good_packets(480)
    results, offsets = Results(setup.database_url), setup.offsets()
    survivor = DaemonProcess(setup.env(), tmp_path / "survivor.log")
    victims: list[DaemonProcess] = []
    kills: list[dict[str, Any]] = []
    try:
        wait_until("the survivor to be assigned", lambda: survivor.assigned() or not survivor.alive(), timeout_s=90)
        with PacedProducer(setup.bootstrap, setup.input_topic, packets, rate=8) as producer:  # spans the kills
            for i in range(4):
                victim = DaemonProcess(setup.env(), tmp_path / f"victim{i}.log")
                victims.append(victim)

                def victim_assigned(v: DaemonProcess = victim) -> bool:
                    return v.assigned() or not v.alive()

                wait_until("the victim to be assigned", victim_assigned, timeout_s=90, every_s=0.1)
                time.sleep(rng.uniform(0.2, 3.0))  # somewhere in poll / classify / write / publish / commit
                if not victim.alive():
                    tally.crashes += 1  # died on its own before the kill
                    continue
                victim.proc.kill()
                kills.append({"rows_at_kill": results.count(db.classifications), "exit": victim.proc.wait(20)})
            producer.join()
        tally.packets_sent = len(packets)
        wait_until("every row", lambda: results.count(db.classifications) >= len(packets) or not survivor.alive(),
                   timeout_s=150)
        wait_until("offsets committed to the end", offsets.at_end, timeout_s=60)
        if not survivor.alive():
            tally.crashes += 1
        elif survivor.stop() != 0:
            tally.crashes += 1
    finally:
        for d in [survivor, *victims]:
            d.close()
    tally.crashes += daemon_log_crashes(survivor.log(), *(v.log() for v in victims))
    tally.faults = {"sigkills": len(kills), "kills": kills}
    tally.seconds = round(time.monotonic() - started, 1)
    report.add(count(tally, setup, results, packets))
    assert len(kills) == 4 and all(k["exit"] == -9 for k in kills), kills
    assert tally.dead_letters == 0
    assert_goal(tally)


# --------------------------------------------------------------------------------------------------- 2: broker restart


def test_broker_stopped_and_restarted_while_consuming_and_producing(private_kafka: RestartableKafka,
                                                                    postgres, topic_prefix: str,
                                                                    report: Report) -> None:
    tally = Tally("Kafka broker stopped (SIGTERM) for 10 s and restarted under load")
    started = time.monotonic()
    url = create_database(postgres.dsn, topic_prefix)
    setup = Setup(private_kafka.bootstrap_servers, topic_prefix, url, partitions=2)
    try:
        db.upgrade(url)
        setup.create_topics()
        packets = good_packets(300)
        results = Results(url)
        worker = DaemonThread(build_daemon(setup.settings(), upgrade_database=False, serve_metrics=False))
        with worker, PacedProducer(setup.bootstrap, setup.input_topic, packets, rate=15) as producer:
            wait_until("the first rows", lambda: results.count(db.classifications) >= 40, timeout_s=90)
            rows_when_stopped = results.count(db.classifications)
            stopped_at = time.monotonic()
            exit_status = private_kafka.stop_broker()
            time.sleep(10)
            down_s = time.monotonic() - stopped_at
            private_kafka.start_broker()
            tally.faults = {"broker_down_s": round(time.monotonic() - stopped_at, 1), "stopped_for_s": round(down_s, 1),
                            "broker_exit": exit_status, "rows_when_stopped": rows_when_stopped}
            producer.join()
            tally.packets_sent = len(packets)
            wait_until("every row", lambda: results.count(db.classifications) >= len(packets)
                       or worker.error is not None, timeout_s=180)
            offsets = setup.offsets()
            wait_until("offsets committed to the end", offsets.at_end, timeout_s=90)
            worker.check()
        tally.crashes = thread_crashes(worker)
        tally.faults["infrastructure_retries"] = worker.retries()
        tally.seconds = round(time.monotonic() - started, 1)
        report.add(count(tally, setup, results, packets))
        assert tally.dead_letters == 0
        assert_goal(tally)
    finally:
        setup.close()
        drop_database(postgres.dsn, topic_prefix)


# --------------------------------------------------------------------------------------------------- 3: PostgreSQL


def test_postgres_stopped_for_30_s_and_restarted(kafka, topic_prefix: str, report: Report) -> None:
    tally = Tally("PostgreSQL stopped (pg_ctl stop -m fast) for 30 s and restarted")
    started = time.monotonic()
    try:
        pg = start_local_postgres()
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))
    setup: Setup | None = None
    try:
        url = create_database(pg.dsn, topic_prefix)
        db.upgrade(url)
        setup = Setup(kafka.bootstrap_servers, topic_prefix, url, partitions=2)
        setup.create_topics()
        packets = good_packets(300)
        results, offsets = Results(url), setup.offsets()
        worker = DaemonThread(build_daemon(setup.settings(), upgrade_database=False, serve_metrics=False))
        with worker:
            produce(setup.bootstrap, setup.input_topic, packets[:100])
            wait_until("the first rows", lambda: results.count(db.classifications) >= 20, timeout_s=90)
            halted_at = time.monotonic()
            pg.halt()
            produce(setup.bootstrap, setup.input_topic, packets[100:])  # traffic goes on during the outage
            wait_until("the daemon to notice the outage", lambda: worker.retries() > 0, timeout_s=60)
            committed = offsets.committed()
            time.sleep(max(0.0, 30 - (time.monotonic() - halted_at)))
            assert offsets.committed() == committed, "offsets moved while PostgreSQL was down"
            worker.check()
            pg.resume()
            tally.faults = {"postgres_down_s": round(time.monotonic() - halted_at, 1)}
            tally.packets_sent = len(packets)
            wait_until("every row after the restart", lambda: results.count(db.classifications) >= len(packets)
                       or worker.error is not None, timeout_s=120)
            wait_until("offsets committed to the end", offsets.at_end, timeout_s=60)
            worker.check()
        tally.crashes = thread_crashes(worker)
        tally.faults["infrastructure_retries"] = worker.retries()
        tally.seconds = round(time.monotonic() - started, 1)
        report.add(count(tally, setup, results, packets))
        assert tally.dead_letters == 0 and worker.stats is not None and worker.stats.dead_lettered == 0
        assert_goal(tally)
    finally:
        if setup is not None:
            setup.close()
        pg.stop()


def test_database_connection_killed_mid_transaction_repeatedly(postgres, setup: Setup, report: Report) -> None:
    """A lock makes the daemon's write wait inside its transaction (its spectra rows inserted, its classifications
    not yet); ``pg_terminate_backend`` then kills that connection. Five times, at seeded random intervals."""
    rng = random.Random(83)
    tally = Tally("database connection killed mid-transaction (pg_terminate_backend), 5 times")
    started = time.monotonic()
    setup.partitions = 2
    setup.create_topics()
    app = f"faults-{setup.prefix}"
    daemon_url = make_url(setup.database_url).update_query_dict({"application_name": app}) \
        .render_as_string(hide_password=False)
    packets = good_packets(400)
    results, offsets = Results(setup.database_url), setup.offsets()
    conninfo = make_url(setup.database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    locker, monitor = psycopg.connect(conninfo), psycopg.connect(conninfo, autocommit=True)  # superuser
    kills: list[str] = []
    waiting: list[tuple[int, str]] = []

    def blocked() -> bool:
        waiting[:] = monitor.execute(
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock' AND xact_start IS NOT NULL", (app,)).fetchall()
        return bool(waiting) or worker.error is not None

    worker = DaemonThread(build_daemon(setup.settings(daemon_url), upgrade_database=False, serve_metrics=False))
    try:
        with worker, PacedProducer(setup.bootstrap, setup.input_topic, packets, rate=25) as producer:
            for _ in range(5):
                time.sleep(rng.uniform(0.3, 2.0))
                with locker.transaction():
                    locker.execute("LOCK TABLE classifications IN EXCLUSIVE MODE")  # readers still read
                    wait_until("a daemon transaction waiting on the lock", blocked, timeout_s=60, every_s=0.05)
                    for pid, state in waiting:
                        terminated = monitor.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
                        if terminated is not None and terminated[0]:
                            kills.append(state)
            producer.join()
            tally.packets_sent = len(packets)
            wait_until("every row", lambda: results.count(db.classifications) >= len(packets)
                       or worker.error is not None, timeout_s=150)
            wait_until("offsets committed to the end", offsets.at_end, timeout_s=60)
            worker.check()
    finally:
        locker.close()
        monitor.close()
    tally.crashes = thread_crashes(worker)
    tally.faults = {"backends_terminated_mid_transaction": len(kills),
                    "infrastructure_retries": worker.retries()}
    tally.seconds = round(time.monotonic() - started, 1)
    report.add(count(tally, setup, results, packets))
    assert len(kills) >= 5 and worker.retries() >= len(kills), (kills, worker.retries())  # each was seen, retried
    assert tally.dead_letters == 0
    assert_goal(tally)


# --------------------------------------------------------------------------------------------------- 4: rebalances


def test_repeated_rebalances_under_load(setup: Setup, report: Report, tmp_path: Path) -> None:
    """A main daemon process, plus members (daemons in this process) joining and leaving, one after another, every
    few seconds for 30 s while 1,000 packets are published."""
    rng = random.Random(84)
    tally = Tally("members joining and leaving every few seconds for 30 s under load")
    started = time.monotonic()
    setup.partitions = 4
    setup.create_topics()
    packets = good_packets(1000)
    results, offsets = Results(setup.database_url), setup.offsets()
    main = DaemonProcess(setup.env(), tmp_path / "main.log")
    members: list[DaemonThread] = []
    try:
        wait_until("the main daemon to be assigned", lambda: main.assigned() or not main.alive(), timeout_s=90)
        with Assignments() as held, PacedProducer(setup.bootstrap, setup.input_topic, packets,
                                                  rate=1000 / 30) as producer:
            churn_until = time.monotonic() + 30
            while time.monotonic() < churn_until:
                member = DaemonThread(build_daemon(setup.settings(), upgrade_database=False, serve_metrics=False),
                                      name=f"member{len(members)}")
                members.append(member)
                with member:  # joins; leaving (stop, finish the batch, commit, close) is the exit
                    joined = time.monotonic()
                    # A cooperative rebalance takes two rounds, each waiting for heartbeats (3 s apart): the member
                    # stays until it has taken partitions from the main daemon (at most 12 s), then 1-2 s more.

                    def member_holds(m: DaemonThread = member) -> bool:
                        return held.count(m.thread) > 0

                    with contextlib.suppress(AssertionError):
                        wait_until("the member to take partitions", member_holds, timeout_s=12, every_s=0.1)
                    tally.faults.setdefault("member_partitions", []).append(held.count(member.thread))
                    time.sleep(rng.uniform(1.0, 2.0))
                tally.faults.setdefault("member_lifetimes_s", []).append(round(time.monotonic() - joined, 1))
            producer.join()
        tally.packets_sent = len(packets)
        wait_until("every row", lambda: results.count(db.classifications) >= len(packets) or not main.alive(),
                   timeout_s=150)
        wait_until("offsets committed to the end", offsets.at_end, timeout_s=60)
        tally.crashes += (not main.alive()) or main.stop() != 0
    finally:
        main.close()
    tally.crashes += thread_crashes(*members) + daemon_log_crashes(main.log())
    tally.faults.update({"joins": len(members), "leaves": len(members),
                         "main_assignments": len(re.findall(r"\bassigned \S+\[\d+\]", main.log())),
                         "main_revocations": len(re.findall(r"\brevoked \S+\[\d+\]", main.log())),
                         "main_retried_commits": main.log().count("infrastructure failure, retrying")})
    tally.seconds = round(time.monotonic() - started, 1)
    report.add(count(tally, setup, results, packets))
    assert len(members) >= 4
    assert sum(1 for n in tally.faults["member_partitions"] if n > 0) >= 4, tally.faults  # they did take work
    assert tally.dead_letters == 0
    assert_goal(tally)


# --------------------------------------------------------------------------------------------------- 5: no output topic


def test_output_topic_missing_commits_nothing_until_it_exists(private_kafka: RestartableKafka, postgres,
                                                              topic_prefix: str, report: Report) -> None:
    tally = Tally("output topic missing (broker does not auto-create), then created")
    started = time.monotonic()
    url = create_database(postgres.dsn, topic_prefix)
    setup = Setup(private_kafka.bootstrap_servers, topic_prefix, url, partitions=2)
    try:
        db.upgrade(url)
        k = setup.settings().kafka
        ensure_topics(k, [setup.input_topic], partitions=2)
        ensure_topics(k, [setup.dlq_topic])
        packets = good_packets(200)
        produce(setup.bootstrap, setup.input_topic, packets)
        results, offsets = Results(url), setup.offsets()
        # librdkafka fails a message to an unknown topic after topic.metadata.propagation.max.ms (30 s by default);
        # 5 s makes each of the daemon's retries shorter, nothing else.
        settings = _with_client_properties(setup.settings(), topic_metadata_propagation_max_ms="5000")
        worker = DaemonThread(build_daemon(settings, upgrade_database=False, serve_metrics=False))
        admin = AdminClient({"bootstrap.servers": setup.bootstrap})
        with worker:
            wait_until("the daemon to fail publishing", lambda: worker.retries() > 0 or worker.error is not None,
                       timeout_s=90)
            time.sleep(8)
            worker.check()
            missing_s = round(time.monotonic() - started, 1)
            assert offsets.committed() == [-1001] * setup.partitions, "offsets committed without the output topic"
            assert setup.output_topic not in admin.list_topics(timeout=20).topics, "the broker auto-created it"
            rows_before = results.count(db.classifications)
            ensure_topics(k, [setup.output_topic])
            tally.faults = {"rows_before_topic_existed (idempotent, not committed)": rows_before,
                            "retries_while_missing": worker.retries(), "missing_for_s": missing_s}
            tally.packets_sent = len(packets)
            wait_until("every row", lambda: results.count(db.classifications) >= len(packets)
                       or worker.error is not None, timeout_s=120)
            wait_until("offsets committed to the end", offsets.at_end, timeout_s=120)
            worker.check()
        tally.crashes = thread_crashes(worker)
        tally.seconds = round(time.monotonic() - started, 1)
        report.add(count(tally, setup, results, packets))
        assert tally.dead_letters == 0
        assert_goal(tally)
    finally:
        setup.close()
        drop_database(postgres.dsn, topic_prefix)


# --------------------------------------------------------------------------------------------------- 6: bad packets


MAX_MESSAGE_BYTES = 60_000  # every good test packet is below it (the largest is ~43 kB)


def _oversized(i: int) -> Packet:
    p = variant(base_packets()[i], 2000 + i)
    p["spectrum_id"] = f"bad/oversized/{i}"
    while len(value := CODEC.encode(p)) <= MAX_MESSAGE_BYTES:
        step = p["wavelength"][-1] - p["wavelength"][0] + 1.0
        p["wavelength"] = p["wavelength"] + [w + step for w in p["wavelength"]]
        p["flux"] = p["flux"] * 2
        p["flux_err"] = None if p.get("flux_err") is None else p["flux_err"] * 2
        p["mask"] = None if p.get("mask") is None else p["mask"] * 2
    return Packet(f"bad-oversized-{i}".encode(), value, None, "oversized")


def _evolved(i: int, *, newer: bool) -> Packet:
    p = variant(base_packets()[i], 3000 + i + (100 if newer else 0))
    if newer:
        record = {**p, "schema_version": NEWER_MINOR, "airmass": 1.2}
    else:
        record = {k: v for k, v in p.items() if k != "exptime"}
        record["schema_version"] = "0.9"
    buf = io.BytesIO()
    fastavro.writer(buf, evolved_schema(newer), [record])  # container framing: the writer schema travels along
    return Packet(p["object_id"].encode(), buf.getvalue(), p["spectrum_id"], "newer" if newer else "older")


BAD_REASONS = {  # kind -> (error class, error field, words in the message)
    "oversized": ("DecodeError", "value", "exceeds the limit"),
    "empty": ("DecodeError", "value", "empty message"),
    "truncated": ("DecodeError", "value", "not a valid"),
    "schema_id": ("DecodeError", "schema_id", "unknown schema id"),
}


def test_oversized_empty_truncated_wrong_schema_and_evolved_packets(setup: Setup, report: Report) -> None:
    tally = Tally("oversized, empty, truncated, wrong schema id; newer and older writer schemas")
    started = time.monotonic()
    setup.partitions = 2
    setup.create_topics()
    good = good_packets(100)
    evolved = [_evolved(i, newer=True) for i in range(10)] + [_evolved(i, newer=False) for i in range(10)]
    bad = [_oversized(i) for i in range(5)] + [bad_packet(kind, i) for kind in ("empty", "truncated", "schema_id")
                                               for i in range(5)]
    mixed = good + evolved + bad
    random.Random(86).shuffle(mixed)
    results, offsets = Results(setup.database_url), setup.offsets()
    settings = setup.settings()
    settings.kafka.max_message_bytes = MAX_MESSAGE_BYTES
    worker = DaemonThread(build_daemon(settings, upgrade_database=False, serve_metrics=False))
    with worker:
        produce(setup.bootstrap, setup.input_topic, mixed)
        tally.packets_sent = len(mixed)
        wait_until("every packet settled",
                   lambda: (results.count(db.classifications), results.count(db.dead_letters))
                   == (len(good) + len(evolved), len(bad)) or worker.error is not None, timeout_s=120)
        wait_until("offsets committed to the end", offsets.at_end, timeout_s=60)
        worker.check()
    tally.crashes = thread_crashes(worker)
    rows = results.query("SELECT source_offset, error_class, error_field, error_message, spectrum_id "
                         "FROM dead_letters")
    dlq = drain(setup.bootstrap, setup.dlq_topic, len(bad))
    tally.faults = {"good": len(good), "newer_minor_with_extra_field": 10, "older_without_optional_field": 10,
                    **{kind: sum(b.kind == kind for b in bad) for kind in BAD_REASONS},
                    "dead_letter_topic_messages": len(dlq)}
    tally.seconds = round(time.monotonic() - started, 1)
    report.add(count(tally, setup, results, good + evolved))
    by_key = {b.key: b for b in bad}
    assert {m.key() for m in dlq} == set(by_key) and len(dlq) == len(bad)
    for m in dlq:
        headers = {k: v.decode() for k, v in m.headers()}
        error_class, error_field, words = BAD_REASONS[by_key[m.key()].kind]
        assert (headers["spectranet.error.class"], headers["spectranet.error.field"]) == (error_class, error_field)
        assert words in headers["spectranet.error.message"], headers
    assert sorted((r.error_class, r.error_field) for r in rows) \
        == sorted(BAD_REASONS[b.kind][:2] for b in bad)
    assert all(r.error_message for r in rows)
    assert tally.dead_letters == len(bad)
    assert_goal(tally)
