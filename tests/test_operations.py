"""Operations surface: metrics and health endpoints, SQL views, model-failure isolation, JSON logs."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.contract.packets import prepare_packet
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.classifier import SpectrumClassifier
from spectranet.streamer.runtime.logs import JsonFormatter
from spectranet.streamer.runtime.metrics import HealthServer, Metrics
from spectranet.streamer.science.checkpoint import load_checkpoint
from spectranet.streamer.science.inference import InferenceEngine

from tests.support.fakes import FakeConsumer, FakeProducer, fake_daemon, fake_messages


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine(load_checkpoint(), device="cpu")


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_endpoints_follow_the_daemon_lifecycle(engine, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    db.upgrade(url)
    metrics = Metrics()
    health = HealthServer(metrics, host="127.0.0.1", port=0).start()
    assert _get(health.port, "/readyz")[0] == 503  # not ready before the loop has started
    assert _get(health.port, "/healthz")[0] == 200
    assert _get(health.port, "/nope")[0] == 404

    msgs, good, bad = fake_messages(6)
    gate = threading.Event()

    class GatedConsumer(FakeConsumer):
        def consume(self, num_messages: int = 1, timeout: float = -1):  # hold the loop until we have looked
            gate.wait(10)
            return super().consume(num_messages, timeout)

    daemon = fake_daemon(GatedConsumer(msgs), FakeProducer(), db.create_engine(url), engine)
    daemon.metrics, daemon.health = metrics, health
    t = threading.Thread(target=daemon.run, kwargs={"max_messages": len(msgs)})
    t.start()
    try:
        deadline = datetime.now().timestamp() + 10
        while _get(health.port, "/readyz")[0] != 200 and datetime.now().timestamp() < deadline:
            time.sleep(0.05)
        assert _get(health.port, "/readyz")[0] == 200
        status, text = _get(health.port, "/metrics")
        assert status == 200 and 'spectranet_model_info{' in text
    finally:
        gate.set()
        t.join(30)
    sample = metrics.registry.get_sample_value
    assert sample("spectranet_spectra_total", {"outcome": "classified"}) == len(good)
    assert sample("spectranet_spectra_total", {"outcome": "dead_lettered"}) == len(bad)
    assert sample("spectranet_dead_letters_total", {"reason": "DecodeError"}) == 1
    assert (sample("spectranet_stage_seconds_count", {"stage": "write"}) or 0) >= 1
    assert sample("spectranet_end_to_end_seconds_count") == len(good)


def test_a_spectrum_that_breaks_the_model_is_isolated(engine, tmp_path: Path, monkeypatch) -> None:
    """Split the batch until the failing spectrum is alone; dead-letter it; classify the others."""
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    db.upgrade(url)
    msgs, good, bad = fake_messages(8)
    poisoned = good[3]["spectrum_id"]
    classifier_engine = InferenceEngine(load_checkpoint(), device="cpu", warmup=False)
    real_predict = classifier_engine.predict
    sentinel: dict[str, Any] = {}

    def predict(batch, z_prior=None):
        if any(p is sentinel.get("bad") for p in batch):
            raise RuntimeError("NaN in the activations")
        return real_predict(batch, z_prior)

    import spectranet.streamer.runtime.classifier as classifier_module

    real_prepare = prepare_packet  # what classifier_module.prepare_packet is until patched below

    def prepare(packet, *args):
        prepared = real_prepare(packet, *args)
        if packet["spectrum_id"] == poisoned:
            sentinel["bad"] = prepared
        return prepared

    monkeypatch.setattr(classifier_engine, "predict", predict)
    monkeypatch.setattr(classifier_module, "prepare_packet", prepare)
    producer = FakeProducer()
    stats = fake_daemon(FakeConsumer(msgs), producer, db.create_engine(url), classifier_engine).run(
        max_messages=len(msgs))
    assert (stats.classified, stats.dead_lettered) == (len(good) - 1, len(bad) + 1)
    inference = [m for m in producer.on("spectra.dlq")
                 if dict(m["headers"])["spectranet.error.class"] == b"InferenceError"]
    assert len(inference) == 1
    assert poisoned.encode() in dict(inference[0]["headers"])["spectranet.error.message"]


def _row(spectrum_id: str, object_id: str, model_version: str, top: str,
         mjd_offset: float = 0.0) -> db.ClassificationRow:
    now = datetime.now(timezone.utc)
    return db.ClassificationRow(
        spectrum={"spectrum_id": spectrum_id, "revision": 0, "object_id": object_id, "survey": "ZTF",
                  "tns_name": None, "instrument": "SEDM", "ra": None, "dec": None, "obs_mjd": 60000 + mjd_offset,
                  "n_pixels": 10, "produced_at": now, "received_at": now},
        classification={"spectrum_id": spectrum_id, "revision": 0, "model_name": "m", "model_version": model_version,
                        "annotation_id": f"{spectrum_id}-{model_version}", "object_id": object_id,
                        "probabilities": {top: 1.0}, "top_class": top, "top_probability": 1.0, "z": 0.1,
                        "z_err": 0.01, "z_method": "model", "coverage_fraction": 1.0, "median_snr": 10.0,
                        "ood_score": 0.1, "flags": [], "processed_at": now, "source_topic": "t",
                        "source_partition": 0, "source_offset": 0})


def test_views_answer_latest_per_object_and_class_changes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v.sqlite'}"
    db.upgrade(url)
    engine = db.create_engine(url)
    db.write_batch(engine, [_row("s1", "objA", "1.0", "Ia", 0), _row("s2", "objA", "1.0", "II", 5),
                            _row("s3", "objB", "1.0", "Ic", 0)])
    db.write_batch(engine, [_row("s1", "objA", "2.0", "Ia", 0), _row("s3", "objB", "2.0", "Ic-BL", 0)])
    with engine.connect() as conn:
        latest = {r.object_id: (r.spectrum_id, r.top_class) for r in
                  conn.execute(sa.text("SELECT * FROM latest_classification_per_object"))}
        changes = conn.execute(sa.text("SELECT object_id, class_a, class_b FROM class_changes_between_models")).all()
        per_spectrum = conn.execute(sa.text(
            "SELECT spectrum_id, model_version FROM latest_classification_per_spectrum ORDER BY spectrum_id")).all()
    assert latest == {"objA": ("s2", "II"), "objB": ("s3", "Ic-BL")}
    assert [tuple(r) for r in changes] == [("objB", "Ic", "Ic-BL")]
    assert [r.spectrum_id for r in per_spectrum] == ["s1", "s2", "s3"]


def test_json_logs_are_one_object_per_line() -> None:
    record = logging.LogRecord("spectranet", logging.WARNING, __file__, 1, "dead-lettering %s", ("x@1",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "WARNING" and entry["message"] == "dead-lettering x@1"


def test_reprocess_with_another_model_keeps_earlier_rows(engine, tmp_path: Path) -> None:
    from spectranet.streamer.tools.reprocess import reprocess
    from spectranet.training.export import export_untrained

    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    db.upgrade(url)
    database = db.create_engine(url)
    msgs, good, bad = fake_messages(5)
    daemon = fake_daemon(FakeConsumer(msgs), FakeProducer(), database, engine)
    daemon.classifier.store_raw_packets = True
    daemon.run(max_messages=len(msgs))

    other = export_untrained(tmp_path / "models", seed=1, version="9.0.0")  # sorts after the shipped one
    second = SpectrumClassifier(InferenceEngine(load_checkpoint(tmp_path / "models" / "spectranet-sedm-9.0.0"),
                                                device="cpu", warmup=False), codec=Codec("spectrum_packet"))
    assert reprocess(database, second) == (len(good), 0)
    assert reprocess(database, second) == (len(good), 0)  # idempotent: same rows again, nothing new
    with database.connect() as conn:
        versions = conn.execute(sa.text(
            "SELECT model_version, count(*) FROM classifications GROUP BY model_version ORDER BY 1")).all()
        changed = conn.execute(sa.text("SELECT count(*) FROM class_changes_between_models")).scalar_one()
        top: dict[str, str] = dict(conn.execute(sa.text(
            "SELECT spectrum_id || model_version, top_class FROM classifications")).all())
    shipped = engine.checkpoint.version
    assert [tuple(v) for v in versions] == [(shipped, len(good)), (other.version, len(good))]
    expected_changes = sum(top[p["spectrum_id"] + shipped] != top[p["spectrum_id"] + other.version] for p in good)
    assert changed == expected_changes
