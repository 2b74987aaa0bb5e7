"""In-process stand-ins for confluent-kafka's Consumer and Producer: fast unit tests of the loop's logic.

They model what the delivery guarantee depends on (batches, synchronous commits, delivery reports that can fail);
the integration tests run the same loop against real brokers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, TopicPartition
from spectranet.streamer.runtime.classifier import StoredMessage

FakeMessage = StoredMessage  # the same in-memory message the reprocess command uses


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
