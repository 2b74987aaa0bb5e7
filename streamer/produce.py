"""Publish spectrum files as spectrum packets (``spectranet produce``), keyed by object id."""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import Producer

from streamer.codec import Codec, Framing
from streamer.errors import SpectraNetError
from streamer.packets import packet_from_file
from streamer.readers import read_spectrum

__all__ = ["publish_files"]


def publish_files(paths: Iterable[str], *, topic: str, bootstrap_servers: str, framing: Framing = "schemaless",
                  survey: str = "TNS", extra_config: dict[str, str] | None = None,
                  timeout_s: float = 60.0) -> tuple[int, list[tuple[str, str]]]:
    """Returns (packets delivered, [(path, error)]); waits for every delivery report."""
    codec = Codec("spectrum_packet")
    producer = Producer({"bootstrap.servers": bootstrap_servers, "enable.idempotence": True, "linger.ms": 20,
                         "compression.type": "lz4", **(extra_config or {})})
    errors: list[tuple[str, str]] = []
    delivered = 0

    def on_delivery(err: object, msg: object) -> None:
        nonlocal delivered
        if err is None:
            delivered += 1
        else:
            errors.append((str(msg), str(err)))

    for path in paths:
        try:
            packet = packet_from_file(read_spectrum(path), survey=survey)
        except SpectraNetError as exc:
            errors.append((str(path), str(exc)))
            continue
        producer.produce(topic, key=packet["object_id"].encode(), value=codec.encode(packet, framing=framing),
                         on_delivery=on_delivery)
        producer.poll(0)
    remaining = producer.flush(timeout_s)
    if remaining:
        errors.append(("<producer>", f"{remaining} packets not delivered within {timeout_s} s"))
    return delivered, errors
