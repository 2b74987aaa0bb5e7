"""Schema 1.2's ``called_class`` end to end: the class called down the taxonomy's tree
(``science.taxonomy.hierarchical_call``) from the engine through the annotated record (1.2, readable as 1.1 and 1.0)
to the ``classifications`` column of migration 0004, on SQLite and on a real PostgreSQL. The daemon on a real Kafka
and PostgreSQL stores it too (``tests/test_outputs_v1_1.py::_check_rows_against_records``)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import spectranet.schemas as schemas
import sqlalchemy as sa
from spectranet.streamer.contract.annotate import Source, build_annotation
from spectranet.streamer.contract.codec import Codec, Framing
from spectranet.streamer.contract.packets import prepare_packet
from spectranet.streamer.runtime import db
from spectranet.streamer.science.checkpoint import Checkpoint, load_checkpoint
from spectranet.streamer.science.inference import InferenceEngine, Prediction
from spectranet.streamer.science.taxonomy import CLASSES, hierarchical_call

from tests.support.fakes import fake_packets
from tests.support.golden import added_optional_fields, plain_json

GOLDEN = Path(__file__).parent / "data" / "golden"
FRAMINGS: tuple[Framing, ...] = ("schemaless", "confluent", "container")


def _golden(name: str, version: str, suffix: str) -> Path:
    return GOLDEN / f"{name}_v{version.replace('.', '_')}.{suffix}"


# ------------------------------------------------------------------------------------------- the contract: 1.2 vs 1.1


@pytest.mark.parametrize("name", schemas.SCHEMA_NAMES)
def test_1_2_only_adds_called_class_to_1_1(name: str) -> None:
    added = added_optional_fields(name, "1.1", "1.2")
    assert added == ({"called_class"} if name == schemas.ANNOTATED_SPECTRUM else set())


def test_the_current_version_is_1_2_with_its_own_bundled_ids() -> None:
    assert schemas.SCHEMA_VERSION == "1.2"
    ids = dict(schemas.BUNDLED_SCHEMA_IDS)
    assert ids[5] == (schemas.SPECTRUM_PACKET, "1.2") and ids[6] == (schemas.ANNOTATED_SPECTRUM, "1.2")
    data = _golden(schemas.ANNOTATED_SPECTRUM, "1.2", "confluent.avro").read_bytes()
    assert int.from_bytes(data[1:5], "big") == 6


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("reader", ["1.0", "1.1"])
def test_1_2_bytes_decode_with_older_readers(framing: Framing, reader: str) -> None:
    data = _golden(schemas.ANNOTATED_SPECTRUM, "1.2", f"{framing}.avro").read_bytes()
    written = json.loads(_golden(schemas.ANNOTATED_SPECTRUM, "1.2", "json").read_text())
    assert written["called_class"] in CLASSES
    old = plain_json(Codec(schemas.ANNOTATED_SPECTRUM, version=reader).decode(data))
    assert "called_class" not in old
    assert sorted(old) == sorted(f["name"] for f in schemas.raw_schema(schemas.ANNOTATED_SPECTRUM, reader)["fields"])
    for key in old:  # every top-level field the old reader knows, as the 1.2 producer wrote it (nested: 1.1's test)
        if key not in ("schema_version", "redshift"):
            assert old[key] == written[key], key
    assert old["redshift"]["z"] == written["redshift"]["z"]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_1_1_bytes_decode_with_the_1_2_reader_with_a_null_call(framing: Framing) -> None:
    data = _golden(schemas.ANNOTATED_SPECTRUM, "1.1", f"{framing}.avro").read_bytes()
    written = json.loads(_golden(schemas.ANNOTATED_SPECTRUM, "1.1", "json").read_text())
    as_1_2 = plain_json(Codec(schemas.ANNOTATED_SPECTRUM, version="1.2").decode(data))
    assert as_1_2 == {**written, "called_class": None}
    row = db.classification_rows({"spectrum_id": "s", "revision": 0, "object_id": "o", "survey": "ZTF",
                                  "instrument": "SEDM", "obs_mjd": 1.0, "wavelength": [1.0]},
                                 Codec(schemas.ANNOTATED_SPECTRUM).decode(data)).classification
    assert row["called_class"] is None and row["top_class"] == written["top_class"]


# ----------------------------------------------------------------------------------------------- the record


@pytest.fixture(scope="module")
def shipped() -> Checkpoint:
    return load_checkpoint()


def test_the_engine_calls_down_the_tree_on_real_spectra(shipped) -> None:
    packets = fake_packets(40)
    engine = InferenceEngine(shipped, device="cpu", templates=None)
    preds = engine.predict([prepare_packet(p, shipped.preprocess) for p in packets])
    probs = np.array([[p.probabilities[c] for c in CLASSES] for p in preds])
    assert [p.called_class for p in preds] == [CLASSES[i] for i in hierarchical_call(probs, CLASSES)]
    assert all(p.top_class == CLASSES[int(np.argmax(row))] for p, row in zip(preds, probs))


def test_a_prediction_without_a_call_calls_its_top_class() -> None:
    probs = {c: (0.92 if c == "Ia" else 0.01) for c in CLASSES}
    p = Prediction(probabilities=probs, top_class="Ia", top_probability=0.92, z=0.03, z_err=0.002, ood_score=0.1)
    assert p.called_class == "Ia"
    assert dataclasses.replace(p, called_class="Ic").called_class == "Ic"


def test_the_annotation_and_its_row_carry_the_call(shipped) -> None:
    probs = {"Ia": 0.40, "Ib": 0.20, "Ic": 0.30, **{c: 0.10 / 6 for c in CLASSES[3:]}}
    prediction = Prediction(probabilities=probs, top_class="Ia", top_probability=0.40, z=0.03, z_err=0.002,
                            ood_score=0.5, called_class="Ic")
    packet = fake_packets(1)[0]
    now = datetime(2026, 12, 2, tzinfo=timezone.utc)
    record = build_annotation(packet, prepare_packet(packet, shipped.preprocess), prediction, shipped,
                              source=Source("spectra", 0, 7), consumed_at=now, classified_at=now)
    assert (record["schema_version"], record["top_class"], record["called_class"]) == ("1.2", "Ia", "Ic")
    codec = Codec(schemas.ANNOTATED_SPECTRUM)
    assert codec.decode(codec.encode(record)) == record
    row = db.classification_rows(packet, record).classification
    assert (row["top_class"], row["called_class"]) == ("Ia", "Ic")


# ------------------------------------------------------------------------------------------------ the migration


def _columns(engine: sa.Engine, table: str) -> list[str]:
    return [c["name"] for c in sa.inspect(engine).get_columns(table)]


def _check_0004_up_and_down(url: str) -> None:
    db.upgrade(url, "0003")
    engine = db.create_engine(url)
    try:
        now = datetime(2026, 12, 1, tzinfo=timezone.utc)
        old = [c for c in db.classifications.c if c.name != "called_class"]
        with engine.begin() as conn:  # a row as a 1.1 daemon stored it
            conn.execute(db.spectra.insert().values(spectrum_id="s1", revision=0, object_id="o1", survey="ZTF",
                                                    instrument="SEDM", obs_mjd=60000.0, n_pixels=10,
                                                    produced_at=now, received_at=now))
            conn.execute(sa.insert(sa.table("classifications", *[sa.column(c.name, c.type) for c in old])).values(
                spectrum_id="s1", revision=0, model_name="m", model_version="1", annotation_id="a" * 36,
                object_id="o1", probabilities={"Ia": 1.0}, top_class="Ia", top_probability=1.0, z=0.1, z_err=0.01,
                z_method="model", coverage_fraction=1.0, median_snr=10.0, ood_score=0.1, flags=[],
                processed_at=now, source_topic="t", source_partition=0, source_offset=0, confident=True))
        assert "called_class" not in _columns(engine, "classifications")
        db.upgrade(url)
        for table in ("classifications", "latest_classification_per_spectrum", "latest_classification_per_object"):
            assert "called_class" in _columns(engine, table), table  # the views see the new column
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT called_class FROM latest_classification_per_object")
                                ).scalar_one() is None  # rows written before: null
            conn.execute(sa.text("UPDATE classifications SET called_class = 'Ic'"))
            got = conn.execute(sa.text("SELECT object_id FROM latest_classification_per_spectrum "
                                       "WHERE called_class <> top_class AND confident")).scalars().all()
        assert got == ["o1"]
        db.downgrade(url, "0003")
        assert "called_class" not in _columns(engine, "classifications")
        assert "called_class" not in _columns(engine, "latest_classification_per_object")
        with engine.connect() as conn:  # the row survives, the views work again
            assert conn.execute(sa.text("SELECT top_class FROM latest_classification_per_object")).scalar_one() == "Ia"
        db.upgrade(url)
        assert "called_class" in _columns(engine, "latest_classification_per_spectrum")
    finally:
        engine.dispose()


def test_migration_0004_up_and_down_on_sqlite(tmp_path) -> None:
    _check_0004_up_and_down(f"sqlite:///{tmp_path / 'm.sqlite'}")


@pytest.mark.integration
def test_migration_0004_up_and_down_on_postgresql(database_url) -> None:
    _check_0004_up_and_down(database_url)
