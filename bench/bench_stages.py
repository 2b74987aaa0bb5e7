"""The daemon's stages one at a time, in microseconds per spectrum, on the real spectra and the shipped model.

    decode      Codec("spectrum_packet").decode of the input packets
    prepare     contract.packets.prepare_packet (contract validation + preprocess.prepare)
    infer       InferenceEngine.predict at the daemon's batch size (64) and at batch 1
    annotate    build_annotation + db.classification_rows
    encode      Codec("annotated_spectrum").encode (the output packet)
    db write    db.write_batch into PostgreSQL: 64-row batches (the daemon) and 1-row transactions (naive)
    produce     confluent_kafka producer with the daemon's settings, flush per 64 (daemon) and per 1 (naive)

Needs a broker and a PostgreSQL server (run_all.py starts them); the pure stages run without.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Callable

from common import load, packets
from confluent_kafka import Producer
from spectranet.streamer.config import load_settings
from spectranet.streamer.contract.annotate import Source, build_annotation
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.contract.packets import prepare_packet
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.classifier import SpectrumClassifier
from spectranet.streamer.runtime.kafka_io import producer_config
from spectranet.streamer.science.checkpoint import load_checkpoint
from spectranet.streamer.science.inference import InferenceEngine


def _us_per_item(fn: Callable[[], int], *, min_time: float) -> tuple[float, int]:
    """Run ``fn`` (returns how many spectra it handled) until ``min_time``; microseconds per spectrum."""
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < min_time:
        n += fn()
    return 1e6 * (time.perf_counter() - start) / n, n


def classifier() -> SpectrumClassifier:
    engine = InferenceEngine(load_checkpoint(None), device="cpu", max_forward_batch=256)
    return SpectrumClassifier(engine, codec=Codec("spectrum_packet"))


def run(*, quick: bool, bootstrap: str, db_url: str, topic: str) -> dict[str, Any]:
    min_time = 0.5 if quick else 2.0
    clf = classifier()
    items = packets(200)
    codec_in, codec_out = clf.codec, Codec("annotated_spectrum")
    raw = [codec_in.encode(p) for p in items]
    decoded = [codec_in.decode(b) for b in raw]
    prepared = [prepare_packet(p, clf.model.preprocess, clf.limits) for p in decoded]
    stages: dict[str, dict[str, Any]] = {}

    def rec(name: str, fn: Callable[[], int], **extra: Any) -> None:
        us, n = _us_per_item(fn, min_time=min_time)
        stages[name] = {"us_per_spectrum": round(us, 1), "spectra": n, "load_average": load(), **extra}
        print(name, stages[name], flush=True)

    rec("decode", lambda: len([codec_in.decode(b) for b in raw]),
        bytes_per_packet=round(sum(map(len, raw)) / len(raw)))
    rec("prepare", lambda: len([prepare_packet(p, clf.model.preprocess, clf.limits) for p in decoded]))
    batch64 = (prepared * 2)[:64]
    rec("infer (batch 64)", lambda: len(clf.engine.predict(batch64)))
    rec("infer (batch 1)", lambda: len([clf.engine.predict([p]) for p in prepared[:32]]))
    preds = clf.engine.predict(prepared)
    now = datetime.now(timezone.utc)

    def annotate(revision: int = 0) -> list[tuple[dict[str, Any], Any]]:
        out = []
        for i, (p, q, pr) in enumerate(zip(decoded, prepared, preds)):
            pk = dict(p, revision=revision)
            ann = build_annotation(pk, q, pr, clf.model, source=Source(topic, 0, i), consumed_at=now,
                                   classified_at=now)
            out.append((ann, db.classification_rows(pk, ann)))
        return out

    rec("annotate", lambda: len(annotate()))
    anns = annotate()
    rec("encode output", lambda: len([codec_out.encode(a) for a, _ in anns]),
        bytes_per_annotation=round(sum(len(codec_out.encode(a)) for a, _ in anns) / len(anns)))

    # database: fresh revisions every call so that every insert is a real insert (not a conflict no-op)
    engine = db.create_engine(db_url)
    db.register_model(engine, name=clf.model.name, version=clf.model.version,
                      weights_sha256=clf.model.weights_sha256, taxonomy=clf.model.taxonomy,
                      model_metadata=clf.model.card())
    revision = iter(range(1, 10**6))

    def write(batch: int) -> int:
        rows = [r for _, r in annotate(next(revision))]
        for i in range(0, len(rows), batch):
            db.write_batch(engine, rows[i:i + batch])
        return len(rows)

    rec("db write (64 rows / txn)", lambda: write(64))
    rec("db write (1 row / txn)", lambda: write(1) if quick else write(1) + write(1))
    engine.dispose()

    settings = load_settings(kafka={"bootstrap_servers": bootstrap})
    producer = Producer(producer_config(settings.kafka))
    encoded = [codec_out.encode(a) for a, _ in anns]

    def produce(batch: int, limit: int | None = None) -> int:
        values = encoded[:limit] if limit else encoded
        for i in range(0, len(values), batch):
            for v in values[i:i + batch]:
                producer.produce(topic, key=b"k", value=v)
            assert producer.flush(30) == 0
        return len(values)

    rec("produce + flush per 64", lambda: produce(64))
    rec("produce + flush per 1", lambda: produce(1, 100))
    producer.flush(30)
    return {"stages": stages, "batch": 64}
