"""In-process stand-ins for confluent-kafka's Consumer and Producer: fast unit tests of the loop's logic.

They model what the delivery guarantee depends on (batches, synchronous commits, delivery reports that can fail);
the integration tests run the same loop against real brokers. ``fake_messages`` makes real packets with bad ones
mixed in, ``fake_daemon`` the real ``Daemon`` wired to these fakes (topics ``IN``, ``OUT``, ``DLQ``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from confluent_kafka import KafkaError, TopicPartition
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.contract.readers import read_spectrum
from spectranet.streamer.runtime.classifier import SpectrumClassifier, StoredMessage
from spectranet.streamer.runtime.daemon import Daemon
from spectranet.streamer.science.inference import InferenceEngine
from spectranet.streamer.tools.files import packet_from_file

from tests.support.common import SPECTRUM_FILES

FakeMessage = StoredMessage  # the same in-memory message the reprocess command uses
IN, OUT, DLQ = "spectra", "spectra.annotated", "spectra.dlq"


@dataclass
class FakeConsumer:
    """Serves ``messages`` from the last committed offset; ``commits`` records every synchronous commit."""

    messages: list[FakeMessage]
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    commits: list[list[TopicPartition]] = field(default_factory=list)
    closed: bool = False
    _position: int | None = None

    paused: list[TopicPartition] = field(default_factory=list)

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.topics = topics
        self.callbacks = callbacks

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in sorted({(m.topic(), m.partition()) for m in self.messages})]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused = list(partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused = []

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        if self.paused:
            return []
        if self._position is None:  # start from committed offsets, like a fresh group member
            self._position = sum(1 for m in self.messages
                                 if m.offset() < self.committed.get((m.topic(), m.partition()), 0))
        batch = self.messages[self._position:self._position + num_messages]
        self._position += len(batch)
        return batch

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        assert asynchronous is False, "the daemon must commit synchronously"
        self.commits.append(offsets)
        for tp in offsets:
            self.committed[(tp.topic, tp.partition)] = tp.offset

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeProducer:
    """Records produced messages; the first ``fail_flushes`` flushes report a delivery error for every message."""

    fail_flushes: int = 0
    delivered: list[dict[str, Any]] = field(default_factory=list)
    _pending: list[tuple[dict[str, Any], Callable[..., None] | None]] = field(default_factory=list)

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None, on_delivery: Callable[..., None] | None = None) -> None:
        self._pending.append(({"topic": topic, "key": key, "value": value, "headers": headers or []}, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = -1) -> int:
        fail = self.fail_flushes > 0 and bool(self._pending)
        if fail:
            self.fail_flushes -= 1
        for msg, cb in self._pending:
            if fail:
                if cb:
                    cb(KafkaError(KafkaError._MSG_TIMED_OUT), None)
            else:
                self.delivered.append(msg)
                if cb:
                    cb(None, None)
        self._pending.clear()
        return 0

    def on(self, topic: str) -> list[dict[str, Any]]:
        return [m for m in self.delivered if m["topic"] == topic]


def fake_packets(n: int) -> list[dict]:
    """The packets of the first ``n`` spectrum files, all produced at the same fixed time."""
    return [packet_from_file(read_spectrum(f), produced_at_ms=1_700_000_000_000) for f in SPECTRUM_FILES[:n]]


def fake_messages(n_good: int) -> tuple[list[FakeMessage], list[dict], set[int]]:
    """``n_good`` real packets with three bad ones mixed in; returns messages, good packets, bad offsets."""
    codec = Codec("spectrum_packet")
    good = fake_packets(n_good)
    values = [codec.encode(p) for p in good]
    short = dict(good[0], spectrum_id="bad-lengths", flux=good[0]["flux"][:-5])
    unit = dict(good[1], spectrum_id="bad-unit", wavelength_unit="furlong")
    bad = {2: b"\x06not avro at all", 5: codec.encode(short), 9: codec.encode(unit)}
    for offset in sorted(bad):
        values.insert(offset, bad[offset])
    msgs = [FakeMessage(IN, 0, i, v, b"key") for i, v in enumerate(values)]
    return msgs, good, set(bad)


def fake_daemon(consumer: FakeConsumer, producer: FakeProducer, database: sa.Engine, engine: InferenceEngine,
                **kw: Any) -> Daemon:
    """The real loop on the fakes: batches of 4, short waits and back-offs; ``kw`` adds options (``pipelined``)."""
    return Daemon(consumer=consumer, producer=producer, database=database,
                  classifier=SpectrumClassifier(engine, codec=Codec("spectrum_packet")), input_topics=[IN],
                  output_topic=OUT, dead_letter_topic=DLQ, output_codec=Codec("annotated_spectrum"),
                  max_packets=4, max_wait_s=0.01, retry_backoff_s=0.01, **kw)
