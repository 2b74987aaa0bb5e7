"""The consumer loop: poll -> decode -> validate -> preprocess -> classify -> write -> publish -> commit.

Delivery guarantee: at-least-once with idempotent effects. A batch's offsets are committed (synchronously) only after
its database transaction has committed *and* every annotated packet and dead letter has a successful delivery report.
If the process dies in between, the batch is consumed again; the database ignores rows it already has (unique per
spectrum, revision and model) and annotated packets carry a deterministic ``annotation_id`` so subscribers can
de-duplicate. A packet that cannot be used is dead-lettered (topic and table) with the reason and never blocks its
batch; a broker or database failure is retried with backoff and is never dead-lettered or committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from streamer import db
from streamer.annotate import Source, build_annotation, result_rows
from streamer.checkpoint import Checkpoint
from streamer.codec import Codec, Framing
from streamer.engine import InferenceEngine
from streamer.errors import InfrastructureError, PacketError
from streamer.packets import Limits, validate_packet
from streamer.preprocess import Prepared, prepare

__all__ = ["Classified", "DeadLetter", "BatchOutcome", "SpectrumClassifier", "Daemon", "RunStats"]

log = logging.getLogger(__name__)


class Message(Protocol):
    """What the loop needs of a Kafka message (confluent_kafka.Message, or a fake in unit tests)."""

    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes]] | None: ...
    def error(self) -> KafkaError | None: ...


@dataclass(frozen=True)
class Classified:
    key: bytes
    annotation: dict[str, Any]
    rows: db.ClassificationRow


@dataclass(frozen=True)
class DeadLetter:
    source: Source
    key: bytes | None
    payload: bytes | None
    headers: list[tuple[str, bytes]]
    error: PacketError
    spectrum_id: str | None
    failed_at: datetime

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        return [*self.headers,
                ("spectranet.error.class", type(self.error).__name__.encode()),
                ("spectranet.error.message", str(self.error).encode()),
                ("spectranet.error.field", (self.error.field or "").encode()),
                ("spectranet.source.topic", self.source.topic.encode()),
                ("spectranet.source.partition", str(self.source.partition).encode()),
                ("spectranet.source.offset", str(self.source.offset).encode()),
                ("spectranet.failed_at", self.failed_at.isoformat().encode())]

    def row(self) -> db.DeadLetterRow:
        return db.DeadLetterRow({
            "source_topic": self.source.topic, "source_partition": self.source.partition,
            "source_offset": self.source.offset, "spectrum_id": self.spectrum_id,
            "error_class": type(self.error).__name__, "error_field": self.error.field,
            "error_message": str(self.error), "payload": self.payload, "failed_at": self.failed_at,
        })


@dataclass(frozen=True)
class BatchOutcome:
    classified: list[Classified]
    dead: list[DeadLetter]
    offsets: list[TopicPartition]  # next offset to consume, per partition in the batch


class SpectrumClassifier:
    """The execute stage: raw messages in, annotations and dead letters out. No broker, no database."""

    def __init__(self, engine: InferenceEngine, *, codec: Codec, limits: Limits = Limits()) -> None:
        self.engine = engine
        self.model: Checkpoint = engine.checkpoint
        self.codec = codec
        self.limits = limits

    def _prepare(self, packet: dict[str, Any]) -> Prepared:
        validate_packet(packet, self.limits)
        wavelength = np.asarray(packet["wavelength"], dtype=np.float64)
        prior = packet.get("redshift_prior")
        if packet["wavelength_frame"] == "rest":
            wavelength = wavelength * (1.0 + prior["z"])  # the model reads observer-frame spectra
        try:
            return prepare(
                wavelength, np.asarray(packet["flux"], dtype=np.float64),
                flux_err=None if packet.get("flux_err") is None else np.asarray(packet["flux_err"], dtype=np.float64),
                mask=None if packet.get("mask") is None else np.asarray(packet["mask"], dtype=bool),
                wavelength_unit=packet["wavelength_unit"], flux_unit=packet["flux_unit"],
                medium=packet["wavelength_medium"], flux_calibrated=packet["flux_calibrated"],
                redshift=prior["z"] if prior else None, config=self.model.preprocess,
            )
        except PacketError as exc:
            raise exc.with_packet(packet["spectrum_id"]) from exc

    def execute(self, messages: Sequence[Message], *, consumed_at: datetime) -> BatchOutcome:
        ready: list[tuple[Message, dict[str, Any], Prepared]] = []
        dead: list[DeadLetter] = []
        offsets: dict[tuple[str, int], int] = {}
        for msg in messages:
            offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
            packet: dict[str, Any] | None = None
            try:
                packet = self.codec.decode(msg.value())
                ready.append((msg, packet, self._prepare(packet)))
            except PacketError as exc:
                pid = packet.get("spectrum_id") if packet else None
                err = exc.with_packet(f"{msg.topic()}[{msg.partition()}]@{msg.offset()}") if pid is None else exc
                log.warning("dead-lettering %s: %s", _where(msg), err)
                dead.append(DeadLetter(source=Source(msg.topic(), msg.partition(), msg.offset()), key=msg.key(),
                                       payload=msg.value(), headers=list(msg.headers() or []), error=err,
                                       spectrum_id=pid, failed_at=datetime.now(timezone.utc)))
        predictions = self.engine.predict([p for _, _, p in ready])
        classified_at = datetime.now(timezone.utc)
        out = []
        for (msg, packet, prepared), pred in zip(ready, predictions):
            ann = build_annotation(packet, prepared, pred, self.model,
                                   source=Source(msg.topic(), msg.partition(), msg.offset()),
                                   consumed_at=consumed_at, classified_at=classified_at)
            out.append(Classified(key=packet["object_id"].encode(), annotation=ann, rows=result_rows(packet, ann)))
        return BatchOutcome(classified=out, dead=dead,
                            offsets=[TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())])


def _where(msg: Message) -> str:
    return f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"


@dataclass
class RunStats:
    batches: int = 0
    classified: int = 0
    dead_lettered: int = 0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def messages(self) -> int:
        return self.classified + self.dead_lettered


class Daemon:
    """Owns the clients; runs ``SpectrumClassifier`` over micro-batches and enforces the delivery guarantee."""

    def __init__(self, *, consumer: Any, producer: Any, database: Engine, classifier: SpectrumClassifier,
                 input_topics: Sequence[str], output_topic: str, dead_letter_topic: str, output_codec: Codec,
                 output_framing: Framing = "schemaless", max_batch_size: int = 64, max_wait_s: float = 1.0,
                 retry_backoff_s: float = 1.0, retry_backoff_max_s: float = 30.0,
                 delivery_timeout_s: float = 60.0) -> None:
        self.consumer, self.producer, self.database = consumer, producer, database
        self.classifier = classifier
        self.input_topics = list(input_topics)
        self.output_topic, self.dead_letter_topic = output_topic, dead_letter_topic
        self.output_codec, self.output_framing = output_codec, output_framing
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self.retry_backoff_s, self.retry_backoff_max_s = retry_backoff_s, retry_backoff_max_s
        self.delivery_timeout_s = delivery_timeout_s
        self.stats = RunStats()

    def run(self, stop: threading.Event | None = None, *, max_messages: int | None = None,
            idle_timeout_s: float | None = None) -> RunStats:
        """Run until ``stop`` is set, ``max_messages`` are committed, or nothing arrives for ``idle_timeout_s``."""
        stop = stop or threading.Event()
        m = self.classifier.model
        db.register_model(self.database, name=m.name, version=m.version, weights_sha256=m.weights_sha256,
                          taxonomy=m.taxonomy, model_metadata=m.card())
        self.consumer.subscribe(self.input_topics)
        last_message = time.monotonic()
        try:
            while not stop.is_set():
                messages = self._poll()                                          # consume
                if not messages:
                    if idle_timeout_s is not None and time.monotonic() - last_message > idle_timeout_s:
                        break
                    continue
                last_message = time.monotonic()
                outcome = self.classifier.execute(messages, consumed_at=datetime.now(timezone.utc))  # execute
                if not self._with_retries(lambda: self._deliver(outcome), stop):  # write, publish, commit
                    break
                self._account(outcome)
                if max_messages is not None and self.stats.messages >= max_messages:
                    break
        finally:
            self.producer.flush(self.delivery_timeout_s)
            self.consumer.close()
        return self.stats

    def _poll(self) -> list[Message]:
        msgs = self.consumer.consume(num_messages=self.max_batch_size, timeout=self.max_wait_s)
        good = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.fatal():
                raise KafkaException(err)
            else:
                log.warning("consumer error (librdkafka retries it): %s", err)
        return good

    def _deliver(self, outcome: BatchOutcome) -> None:
        """Write, publish, then commit offsets; raises ``InfrastructureError`` before committing if any step fails."""
        db.write_batch(self.database, [c.rows for c in outcome.classified], [d.row() for d in outcome.dead])
        failures: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for c in outcome.classified:
            self.producer.produce(self.output_topic, key=c.key, on_delivery=on_delivery,
                                  value=self.output_codec.encode(c.annotation, framing=self.output_framing))
        for d in outcome.dead:
            self.producer.produce(self.dead_letter_topic, key=d.key, value=d.payload, headers=d.kafka_headers(),
                                  on_delivery=on_delivery)
        remaining = self.producer.flush(self.delivery_timeout_s)
        if remaining or failures:
            raise InfrastructureError(f"{remaining} messages undelivered, {len(failures)} failed: {failures[:3]}")
        self.consumer.commit(offsets=outcome.offsets, asynchronous=False)

    def _with_retries(self, action: Callable[[], None], stop: threading.Event) -> bool:
        backoff = self.retry_backoff_s
        while True:
            try:
                action()
                return True
            except (InfrastructureError, DBAPIError, KafkaException) as exc:
                log.error("infrastructure failure, retrying in %.1f s (nothing committed): %s", backoff, exc)
                if stop.wait(backoff):
                    return False
                backoff = min(backoff * 2, self.retry_backoff_max_s)

    def _account(self, outcome: BatchOutcome) -> None:
        self.stats.batches += 1
        self.stats.classified += len(outcome.classified)
        self.stats.dead_lettered += len(outcome.dead)
        for tp in outcome.offsets:
            self.stats.committed[(tp.topic, tp.partition)] = tp.offset
        log.info("batch %d: %d classified, %d dead-lettered; committed %s", self.stats.batches,
                 len(outcome.classified), len(outcome.dead),
                 ", ".join(f"{tp.topic}[{tp.partition}]={tp.offset}" for tp in outcome.offsets))
