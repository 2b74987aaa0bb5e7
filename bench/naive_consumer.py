"""The consumer a first version is usually written as: one message at a time, every step synchronous.

poll one -> decode -> preprocess -> infer one (``engine.predict([one])``) -> insert one row (its own transaction) ->
produce one + flush -> commit synchronously. Same broker, database, model, codec and client settings as the daemon;
only the batching and the overlap are missing. The baseline for "our daemon's throughput as a multiple of it".

    python bench/naive_consumer.py --bootstrap HOST:PORT --topic T --database-url URL --max-messages N
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from typing import Any

from common import load
from confluent_kafka import Consumer, Producer
from spectranet.streamer.config import load_settings
from spectranet.streamer.contract.annotate import Source, build_annotation
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.contract.packets import prepare_packet
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.classifier import SpectrumClassifier
from spectranet.streamer.runtime.kafka_io import producer_config
from spectranet.streamer.science.checkpoint import load_checkpoint
from spectranet.streamer.science.inference import InferenceEngine


def run(*, bootstrap: str, topic: str, output_topic: str, database_url: str, group: str, max_messages: int,
        time_limit_s: float) -> dict[str, Any]:
    engine = InferenceEngine(load_checkpoint(None), device="cpu", max_forward_batch=1)
    clf = SpectrumClassifier(engine, codec=Codec("spectrum_packet"))
    out_codec = Codec("annotated_spectrum")
    database = db.create_engine(database_url)
    m = clf.model
    db.register_model(database, name=m.name, version=m.version, weights_sha256=m.weights_sha256,
                      taxonomy=m.taxonomy, model_metadata=m.card())
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    producer = Producer(producer_config(load_settings(kafka={"bootstrap_servers": bootstrap}).kafka))
    consumer.subscribe([topic])
    done, first, failures = 0, None, 0
    try:
        deadline = time.monotonic() + 120.0  # for the first message (group join)
        while done < max_messages and time.monotonic() < deadline:
            msg = consumer.poll(1.0)                                                   # poll one
            if msg is None:
                continue
            if msg.error():
                raise RuntimeError(msg.error())
            if first is None:
                first = time.perf_counter()
                deadline = time.monotonic() + time_limit_s
            consumed_at = datetime.now(timezone.utc)
            packet = clf.codec.decode(msg.value())                                     # decode
            prepared = prepare_packet(packet, m.preprocess, clf.limits)                # validate, preprocess
            pred = engine.predict([prepared])[0]                                       # infer one
            msg_topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            if msg_topic is None or partition is None or offset is None:
                raise RuntimeError("a consumed message without its topic, partition or offset")
            ann = build_annotation(packet, prepared, pred, m, source=Source(msg_topic, partition, offset),
                                   consumed_at=consumed_at, classified_at=datetime.now(timezone.utc))
            db.write_batch(database, [db.classification_rows(packet, ann)])            # insert one row, one txn
            producer.produce(output_topic, key=packet["object_id"].encode(), value=out_codec.encode(ann))
            failures += producer.flush(30)                                             # produce one + flush
            consumer.commit(message=msg, asynchronous=False)                           # commit synchronously
            done += 1
        elapsed = time.perf_counter() - first if first is not None else float("nan")
    finally:
        consumer.close()
        database.dispose()
    return {"messages": done, "seconds": round(elapsed, 2), "spectra_per_s": round(done / elapsed, 2),
            "undelivered": failures, "load_average": load()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--output-topic", default="naive-out")
    ap.add_argument("--database-url", required=True, help="a database already at the current schema")
    ap.add_argument("--group", default="naive")
    ap.add_argument("--max-messages", type=int, default=500)
    ap.add_argument("--time-limit", type=float, default=120.0)
    args = ap.parse_args()
    print(json.dumps(run(bootstrap=args.bootstrap, topic=args.topic, output_topic=args.output_topic,
                         database_url=args.database_url, group=args.group, max_messages=args.max_messages,
                         time_limit_s=args.time_limit)))


if __name__ == "__main__":
    main()
