"""The execute stage: raw Kafka messages in, annotations and dead letters out. No broker, no database.

``SpectrumClassifier.execute`` decodes, validates and preprocesses each message, classifies the batch (splitting it
until a spectrum that breaks the model is alone, and dead-lettering only that one), and builds the annotated record
and the result rows. The daemon, ``spectranet reprocess`` and the benchmarks all run it; ``StoredMessage`` dresses
bytes held in memory (stored packets, the unit tests' fakes) as a Kafka message.

``whose_fault`` is the one place that decides, for any exception on a packet's path (here, in the database write,
in publishing), whether the packet is to blame (dead-letter it, the batch goes on) or the infrastructure (retry,
commit nothing). A ``DeadLetter`` always fits its table: its text is made storable (``db.storable``) with a note.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

import sqlalchemy as sa
import torch
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from spectranet.streamer.contract.annotate import Source, build_annotation
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.contract.packets import Limits, prepare_packet
from spectranet.streamer.errors import (
    InferenceError,
    InfrastructureError,
    PacketError,
    ProcessingError,
    PublishError,
    StorageError,
)
from spectranet.streamer.runtime import db
from spectranet.streamer.science.checkpoint import Checkpoint
from spectranet.streamer.science.inference import InferenceEngine, Prediction
from spectranet.streamer.science.preprocess import Prepared

__all__ = ["Message", "StoredMessage", "Classified", "DeadLetter", "BatchOutcome", "SpectrumClassifier", "Stage",
           "whose_fault", "dead_letter", "where"]

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


Stage = Literal["process", "store", "publish"]
_MESSAGE_FAULTS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE})  # the broker or the client refuses this message as such
_MAX_REASON_CHARS = 500  # of a library's exception message quoted in a dead letter's reason


def whose_fault(exc: BaseException, *, stage: Stage, packet_id: str | None = None) -> PacketError | None:
    """The one decision point for "whose fault is it", for any exception raised on a packet's path.

    Returns the ``PacketError`` to dead-letter the packet with (the packet's fault: it goes to the dead-letter topic
    and table with this reason, and its batch goes on), or None (the infrastructure's: retried with backoff, nothing
    committed, never dead-lettered).

    - The project's own errors say which they are: ``PacketError`` or ``InfrastructureError``.
    - Exhausted resources (``MemoryError``, CUDA out of memory) are the machine's.
    - Database errors by kind (``db.is_row_error``): a row refused for its values (data and integrity errors: too
      long, a NUL, an untranslatable character) is the packet's; a lost connection, a server down, a missing table
      or any other database error is the infrastructure's.
    - Kafka errors by kind: a message refused as too large is the message's; any other is the broker's.
    - Anything else raised while *processing* a packet (``stage="process"``: decode, validate, preprocess,
      classify, annotate, encode; pure code, so a retry would fail the same way) is the packet's
      (``ProcessingError``); raised while storing or publishing it, the infrastructure's.
    """
    if isinstance(exc, PacketError):
        return exc
    if isinstance(exc, (InfrastructureError, MemoryError, torch.cuda.OutOfMemoryError)):
        return None
    if isinstance(exc, sa.exc.SQLAlchemyError) or stage == "store":
        if db.is_row_error(exc):
            return StorageError(f"the database refused the row: {_reason(exc)}", packet_id=packet_id)
        return None
    if isinstance(exc, KafkaException):
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() in _MESSAGE_FAULTS:
            return PublishError(f"the broker refused the message: {err.str()}", packet_id=packet_id)
        return None
    if stage == "process" and not isinstance(exc, OSError):
        return ProcessingError(f"unexpected {type(exc).__name__}: {_reason(exc)}", packet_id=packet_id)
    return None


def _reason(exc: BaseException) -> str:
    """The first line of a library exception's message (the database's own, not SQLAlchemy's SQL and parameters)."""
    text = str(exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc)
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= _MAX_REASON_CHARS else line[:_MAX_REASON_CHARS] + "..."


@dataclass(frozen=True)
class Classified:
    key: bytes
    annotation: dict[str, Any]
    rows: db.ClassificationRow
    message: Message  # as consumed: dead-lettered from it if its annotation cannot be encoded or its rows stored


@dataclass(frozen=True)
class DeadLetter:
    source: Source
    key: bytes | None
    payload: bytes | None
    headers: list[tuple[str, bytes]]
    error: PacketError
    spectrum_id: str | None
    failed_at: datetime

    def kafka_headers(self, *, original: bool = True) -> list[tuple[str, bytes]]:
        """The original message's headers (unless ``original`` is false) and the dead letter's own."""
        message = str(self.error)
        if len(message) > _MAX_HEADER_CHARS:
            message = message[:_MAX_HEADER_CHARS] + "..."
        return [*(self.headers if original else []),
                ("spectranet.error.class", type(self.error).__name__.encode()),
                ("spectranet.error.message", message.encode("utf-8", "replace")),
                ("spectranet.error.field", (self.error.field or "").encode()),
                ("spectranet.source.topic", self.source.topic.encode()),
                ("spectranet.source.partition", str(self.source.partition).encode()),
                ("spectranet.source.offset", str(self.source.offset).encode()),
                ("spectranet.failed_at", self.failed_at.isoformat().encode())]

    def row(self) -> db.DeadLetterRow:
        """The ``dead_letters`` row; text the table cannot hold as is (a NUL, too long) is made to fit, with a note
        in ``error_message`` saying what changed."""
        c = db.dead_letters.c
        values: dict[str, Any] = {"spectrum_id": self.spectrum_id, "error_class": type(self.error).__name__,
                                  "error_field": self.error.field}
        notes = []
        for name in values:
            values[name], change = db.storable(c[name], values[name])
            if change:
                notes.append(f"{name} stored sanitised: {change}")
        message = str(self.error) + (f" [{'; '.join(notes)}]" if notes else "")
        values["error_message"] = db.storable(c.error_message, message)[0]
        return db.DeadLetterRow({
            "source_topic": self.source.topic, "source_partition": self.source.partition,
            "source_offset": self.source.offset, **values, "payload": self.payload, "failed_at": self.failed_at,
        })

    def minimal_row(self, why: str) -> db.DeadLetterRow:
        """The last resort when even ``row()`` is refused: coordinates, error class and the original bytes only."""
        note = (f"{type(self.error).__name__}: the full dead letter could not be stored ({why}); its reason is in "
                f"the dead-letter topic's headers")
        return db.DeadLetterRow({
            "source_topic": self.source.topic, "source_partition": self.source.partition,
            "source_offset": self.source.offset, "spectrum_id": None,
            "error_class": db.storable(db.dead_letters.c.error_class, type(self.error).__name__)[0],
            "error_field": None, "error_message": db.storable(db.dead_letters.c.error_message, note)[0],
            "payload": self.payload, "failed_at": self.failed_at,
        })


_MAX_HEADER_CHARS = 1_000  # of the error message in a dead letter's Kafka headers


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
        """Every message ends in ``classified`` or ``dead``; only infrastructure failures raise (``whose_fault``)."""
        ready: list[tuple[Message, dict[str, Any], Prepared]] = []
        dead: list[DeadLetter] = []
        offsets: dict[tuple[str, int], int] = {}
        for msg in messages:                                               # decode, validate, preprocess
            offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
            packet: dict[str, Any] | None = None
            try:
                packet = self.codec.decode(msg.value(), source=where(msg))
                ready.append((msg, packet, prepare_packet(packet, self.model.preprocess, self.limits)))
            except Exception as exc:  # noqa: BLE001 - sorted by whose_fault; the infrastructure's is re-raised
                dead.append(_blamed(msg, exc, packet))
        predicted = self._predict_isolating(ready, dead)                         # classify
        classified_at = datetime.now(timezone.utc)
        out = []
        for (msg, packet, prepared), pred in predicted:                           # annotate
            try:
                ann = build_annotation(packet, prepared, pred, self.model,
                                       source=Source(msg.topic(), msg.partition(), msg.offset()),
                                       consumed_at=consumed_at, classified_at=classified_at)
                rows = db.classification_rows(packet, ann)
            except Exception as exc:  # noqa: BLE001 - as above
                dead.append(_blamed(msg, exc, packet))
                continue
            if self.store_raw_packets:
                rows.spectrum["raw_packet"] = msg.value()
            out.append(Classified(key=packet["object_id"].encode(), annotation=ann, rows=rows, message=msg))
        return BatchOutcome(classified=out, dead=dead,
                            offsets=[TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())])

    def _predict_isolating(self, ready: list[tuple[Message, dict[str, Any], Prepared]],
                           dead: list[DeadLetter]) -> list[tuple[tuple[Message, dict[str, Any], Prepared], Prediction]]:
        """Predict the batch; if the model fails, split it until the failing spectrum is alone and dead-letter it."""
        if not ready:
            return []
        try:
            priors = [float(packet["redshift_prior"]["z"]) if packet.get("redshift_prior") else math.nan
                      for _, packet, _ in ready]  # a known redshift: the classifier reads its rest frame
            return list(zip(ready, self.engine.predict([p for _, _, p in ready], z_prior=priors)))
        except Exception as exc:
            if whose_fault(exc, stage="process") is None:
                raise  # out of memory (the engine already halved down to one spectrum): not this packet's
            if len(ready) == 1:
                msg, packet, _ = ready[0]
                err = InferenceError(f"model failed: {type(exc).__name__}: {_reason(exc)}", field="flux",
                                     packet_id=packet["spectrum_id"])
                dead.append(dead_letter(msg, err, packet))
                return []
            half = len(ready) // 2
            return self._predict_isolating(ready[:half], dead) + self._predict_isolating(ready[half:], dead)


def _blamed(msg: Message, exc: Exception, packet: dict[str, Any] | None) -> DeadLetter:
    """The dead letter for an exception raised while processing ``msg``; re-raises the infrastructure's."""
    pid = packet.get("spectrum_id") if packet else None
    err = whose_fault(exc, stage="process", packet_id=pid)
    if err is None:
        raise exc
    if isinstance(err, ProcessingError):
        log.error("unexpected error processing %s; dead-lettering it (a bug report is due)", where(msg), exc_info=exc)
    return dead_letter(msg, err, packet)


def dead_letter(msg: Message, exc: PacketError, packet: dict[str, Any] | None) -> DeadLetter:
    """``msg`` as a dead letter with reason ``exc`` (the decoded ``packet``, when there is one, names it)."""
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
