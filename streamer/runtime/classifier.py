"""The execute stage: raw Kafka messages in, annotations and dead letters out. No broker, no database.

``SpectrumClassifier.execute`` decodes, validates and preprocesses each message, classifies the batch (splitting it
until a spectrum that breaks the model is alone, and dead-lettering only that one), and builds the annotated record
and the result rows. The daemon, ``spectranet reprocess`` and the benchmarks all run it; ``StoredMessage`` dresses
bytes held in memory (stored packets, the unit tests' fakes) as a Kafka message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

import torch
from confluent_kafka import KafkaError, TopicPartition
from spectranet.streamer.contract.annotate import Source, build_annotation
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.contract.packets import Limits, prepare_packet
from spectranet.streamer.errors import InferenceError, PacketError
from spectranet.streamer.runtime import db
from spectranet.streamer.science.checkpoint import Checkpoint
from spectranet.streamer.science.inference import InferenceEngine, Prediction
from spectranet.streamer.science.preprocess import Prepared

__all__ = ["Message", "StoredMessage", "Classified", "DeadLetter", "BatchOutcome", "SpectrumClassifier", "where"]

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

    def __init__(self, engine: InferenceEngine, *, codec: Codec, limits: Limits = Limits(),
                 store_raw_packets: bool = False) -> None:
        self.engine = engine
        self.model: Checkpoint = engine.checkpoint
        self.codec = codec
        self.limits = limits
        self.store_raw_packets = store_raw_packets

    def execute(self, messages: Sequence[Message], *, consumed_at: datetime) -> BatchOutcome:
        ready: list[tuple[Message, dict[str, Any], Prepared]] = []
        dead: list[DeadLetter] = []
        offsets: dict[tuple[str, int], int] = {}
        for msg in messages:                                               # decode, validate, preprocess
            offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
            packet: dict[str, Any] | None = None
            try:
                packet = self.codec.decode(msg.value())
                ready.append((msg, packet, prepare_packet(packet, self.model.preprocess, self.limits)))
            except PacketError as exc:
                dead.append(_dead_letter(msg, exc, packet))
        predicted = self._predict_isolating(ready, dead)                         # classify
        classified_at = datetime.now(timezone.utc)
        out = []
        for (msg, packet, prepared), pred in predicted:
            ann = build_annotation(packet, prepared, pred, self.model,
                                   source=Source(msg.topic(), msg.partition(), msg.offset()),
                                   consumed_at=consumed_at, classified_at=classified_at)
            rows = db.classification_rows(packet, ann)
            if self.store_raw_packets:
                rows.spectrum["raw_packet"] = msg.value()
            out.append(Classified(key=packet["object_id"].encode(), annotation=ann, rows=rows))
        return BatchOutcome(classified=out, dead=dead,
                            offsets=[TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())])

    def _predict_isolating(self, ready: list[tuple[Message, dict[str, Any], Prepared]],
                           dead: list[DeadLetter]) -> list[tuple[tuple[Message, dict[str, Any], Prepared], Prediction]]:
        """Predict the batch; if the model fails, split it until the failing spectrum is alone and dead-letter it."""
        if not ready:
            return []
        try:
            return list(zip(ready, self.engine.predict([p for _, _, p in ready])))
        except torch.cuda.OutOfMemoryError:
            raise  # the engine already halved down to one spectrum: an infrastructure problem, not this packet's
        except (RuntimeError, ValueError) as exc:
            if len(ready) == 1:
                msg, packet, _ = ready[0]
                err = InferenceError(f"model failed: {type(exc).__name__}: {exc}", field="flux",
                                     packet_id=packet["spectrum_id"])
                dead.append(_dead_letter(msg, err, packet))
                return []
            half = len(ready) // 2
            return self._predict_isolating(ready[:half], dead) + self._predict_isolating(ready[half:], dead)


def _dead_letter(msg: Message, exc: PacketError, packet: dict[str, Any] | None) -> DeadLetter:
    pid = packet.get("spectrum_id") if packet else None
    err = exc.with_packet(where(msg)) if pid is None else exc
    log.warning("dead-lettering %s: %s", where(msg), err)
    return DeadLetter(source=Source(msg.topic(), msg.partition(), msg.offset()), key=msg.key(), payload=msg.value(),
                      headers=list(msg.headers() or []), error=err, spectrum_id=pid,
                      failed_at=datetime.now(timezone.utc))


def where(msg: Message) -> str:
    """``topic[partition]@offset``: a message's coordinates in logs and errors."""
    return f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"


@dataclass(frozen=True)
class StoredMessage:
    """A packet held in memory dressed as a Kafka message (stored packets here; the unit tests' fake consumer)."""

    _topic: str
    _partition: int
    _offset: int
    _value: bytes | None
    _key: bytes | None = None
    _headers: list[tuple[str, bytes]] | None = None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def error(self) -> KafkaError | None:
        return None
