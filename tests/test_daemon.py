"""The loop's delivery logic with in-process fakes and SQLite: dead letters, retries, idempotent replays."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.contract.packets import Limits, prepare_packet
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.classifier import SpectrumClassifier
from spectranet.streamer.science.checkpoint import load_checkpoint
from spectranet.streamer.science.inference import InferenceEngine

from tests.support.fakes import DLQ, IN, OUT, FakeConsumer, FakeMessage, FakeProducer, fake_packets
from tests.support.fakes import fake_daemon as _daemon
from tests.support.fakes import fake_messages as _messages


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine(load_checkpoint(), device="cpu")


@pytest.fixture
def database(tmp_path: Path) -> sa.Engine:
    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    db.upgrade(url)
    return db.create_engine(url)


def _rows(database: sa.Engine, table: sa.Table) -> list[dict]:
    with database.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(table)).mappings()]


@pytest.mark.parametrize("pipelined", [True, False])
def test_bad_packets_are_dead_lettered_and_good_ones_classified(engine, database, pipelined: bool) -> None:
    msgs, good, bad = _messages(10)
    consumer, producer = FakeConsumer(msgs), FakeProducer()
    stats = _daemon(consumer, producer, database, engine, pipelined=pipelined).run(max_messages=len(msgs))

    assert (stats.classified, stats.dead_lettered) == (10, 3)
    assert {r["spectrum_id"] for r in _rows(database, db.classifications)} == {p["spectrum_id"] for p in good}
    out = [Codec("annotated_spectrum").decode(m["value"]) for m in producer.on(OUT)]
    assert sorted(a["spectrum_id"] for a in out) == sorted(p["spectrum_id"] for p in good)
    assert all(abs(sum(c["probability"] for c in a["classifications"]) - 1) < 1e-5 for a in out)

    dlq = producer.on(DLQ)
    assert [int(dict(m["headers"])["spectranet.source.offset"]) for m in dlq] == sorted(bad)
    reasons = {dict(m["headers"])["spectranet.error.field"].decode(): dict(m["headers"])["spectranet.error.class"]
               for m in dlq}
    assert reasons == {"value": b"DecodeError", "flux": b"ValidationError", "wavelength_unit": b"UnitError"}
    assert all(m["value"] == msgs[int(dict(m["headers"])["spectranet.source.offset"])].value() for m in dlq)
    dead_rows = _rows(database, db.dead_letters)
    assert sorted(r["source_offset"] for r in dead_rows) == sorted(bad)
    assert consumer.committed == {(IN, 0): len(msgs)}
    assert consumer.closed


def test_offsets_wait_for_delivery_reports(engine, database) -> None:
    msgs, good, _ = _messages(6)
    consumer, producer = FakeConsumer(msgs), FakeProducer(fail_flushes=2)
    stats = _daemon(consumer, producer, database, engine).run(max_messages=len(msgs))
    # The first batch failed delivery twice: nothing was committed until it was delivered.
    assert consumer.commits and len(consumer.commits) == stats.batches
    first_commit_offsets = {tp.offset for tp in consumer.commits[0]}
    assert first_commit_offsets == {4}
    assert len(producer.on(OUT)) == 6 and stats.classified == 6
    assert len(_rows(database, db.classifications)) == 6


def test_database_failure_never_commits_and_never_dead_letters(engine, tmp_path) -> None:
    msgs, _, _ = _messages(4)
    broken = db.create_engine(f"sqlite:///{tmp_path / 'no-tables.sqlite'}")  # no migration: inserts fail
    db.metadata.tables["models"].create(broken)  # the registry works, the results tables do not exist
    consumer, producer = FakeConsumer(msgs), FakeProducer()
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    stats = _daemon(consumer, producer, broken, engine).run(stop, max_messages=len(msgs))
    timer.cancel()
    assert consumer.commits == []
    assert producer.delivered == []
    assert stats.messages == 0


def test_replaying_a_batch_is_idempotent(engine, database) -> None:
    msgs, good, _ = _messages(5)
    first, second = FakeProducer(), FakeProducer()
    _daemon(FakeConsumer(msgs), first, database, engine).run(max_messages=len(msgs))
    _daemon(FakeConsumer(msgs), second, database, engine).run(max_messages=len(msgs))  # crash before commit
    assert len(_rows(database, db.classifications)) == 5
    assert len(_rows(database, db.spectra)) == 5
    ids_first = sorted(Codec("annotated_spectrum").decode(m["value"])["annotation_id"] for m in first.on(OUT))
    ids_second = sorted(Codec("annotated_spectrum").decode(m["value"])["annotation_id"] for m in second.on(OUT))
    assert ids_first == ids_second and len(set(ids_first)) == 5


def test_resumes_after_committed_offsets(engine, database) -> None:
    msgs, _, _ = _messages(6)
    consumer = FakeConsumer(msgs, committed={(IN, 0): 4})
    producer = FakeProducer()
    stats = _daemon(consumer, producer, database, engine).run(max_messages=len(msgs) - 4)
    assert stats.messages == len(msgs) - 4
    assert consumer.committed == {(IN, 0): len(msgs)}


def test_revocation_commits_the_batch_in_flight_first(engine, database) -> None:
    """A rebalance arriving while batch N is being delivered: N is committed before the partitions go."""
    msgs, good, _ = _messages(6)

    class RevokingConsumer(FakeConsumer):
        polls = 0

        def consume(self, num_messages: int = 1, timeout: float = -1):
            self.polls += 1
            if self.polls == 2:  # batch 1 is in flight now
                self.callbacks["on_revoke"](self, self.assignment())
                self.revoked_commits = list(self.commits)
                self.callbacks["on_assign"](self, self.assignment())
            return super().consume(num_messages, timeout)

    consumer = RevokingConsumer(msgs)
    _daemon(consumer, FakeProducer(), database, engine).run(max_messages=len(msgs))
    assert [tp.offset for tp in consumer.revoked_commits[0]] == [4]  # batch 1 committed inside on_revoke
    assert consumer.committed == {(IN, 0): len(msgs)}


def test_revoked_partitions_leave_the_lag_gauge(engine, database) -> None:
    """After a rebalance the partition's lag is reported by its new owner; this replica's last value must go, or the
    sum over replicas (what the autoscaler reads) counts it twice until a restart."""
    msgs, _, _ = _messages(6)

    class WatermarkConsumer(FakeConsumer):
        def get_watermark_offsets(self, tp, cached: bool = False) -> tuple[int, int]:
            return 0, len(msgs) + 5  # five more than we have: a lag of 5 after the last commit

    consumer = WatermarkConsumer(msgs)
    daemon = _daemon(consumer, FakeProducer(), database, engine)
    daemon.run(max_messages=len(msgs))
    lag = daemon.metrics.registry.get_sample_value("spectranet_consumer_lag", {"topic": IN, "partition": "0"})
    assert lag == 5
    consumer.callbacks["on_revoke"](consumer, consumer.assignment())
    assert daemon.metrics.registry.get_sample_value("spectranet_consumer_lag", {"topic": IN, "partition": "0"}) is None
    consumer.callbacks["on_revoke"](consumer, consumer.assignment())  # revoked again (on_lost): no error


def test_a_packets_redshift_prior_is_the_rest_frame_it_is_classified_in(engine) -> None:
    codec = Codec("spectrum_packet")
    classifier = SpectrumClassifier(engine, codec=codec)
    packet = fake_packets(1)[0]
    assert packet.get("redshift_prior") is None
    plain = classifier.execute([FakeMessage(IN, 0, 0, codec.encode(packet), b"k")],
                               consumed_at=datetime.now(timezone.utc)).classified[0].annotation
    far = plain["redshift"]["z_network"] + 0.3
    with_prior = dict(packet, redshift_prior={"z": far, "z_err": 0.001, "origin": "host galaxy"})
    given = classifier.execute([FakeMessage(IN, 0, 1, codec.encode(with_prior), b"k")],
                               consumed_at=datetime.now(timezone.utc)).classified[0].annotation
    assert given["redshift"]["method"] == "prior" and given["redshift"]["z"] == far
    prepared = prepare_packet(packet, engine.checkpoint.preprocess, Limits())
    expected = engine.predict([prepared], z_prior=[far])[0].probabilities
    got = {c["class_name"]: c["probability"] for c in given["classifications"]}
    assert got == pytest.approx(expected, abs=1e-6)
    assert got != pytest.approx({c["class_name"]: c["probability"] for c in plain["classifications"]}, abs=1e-3)
