"""Schema 1.1's outputs end to end: the refined redshift and its method, the network's own, the best-matching
template, ``confident`` and the ``out_of_distribution`` flag, from the engine through the annotated record (1.1,
readable as 1.0) to the ``classifications`` columns of migration 0003, on SQLite with fakes and on real Kafka and
PostgreSQL.

The shipped model (0.3.0) has no calibration; these tests give it a hand-made one (``_calibrated``), so that
``confident`` and ``out_of_distribution`` take both values on real spectra.
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import spectranet.schemas as schemas
import sqlalchemy as sa
from spectranet.streamer.app import build_daemon
from spectranet.streamer.contract.annotate import (
    OUT_OF_DISTRIBUTION,
    TEMPLATE_STRING_LIMITS,
    Source,
    build_annotation,
    check_template_bank,
)
from spectranet.streamer.contract.codec import Codec, Framing
from spectranet.streamer.contract.packets import prepare_packet
from spectranet.streamer.errors import ConfigError
from spectranet.streamer.runtime import db
from spectranet.streamer.science.calibration import Calibration, OutOfDistribution
from spectranet.streamer.science.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from spectranet.streamer.science.inference import (
    TEMPLATES_DEFAULT,
    InferenceEngine,
    Prediction,
    resolve_template_bank,
)
from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.streamer.science.templates import TemplateBank, TemplateMatch
from spectranet.streamer.tools.files import publish_files

from tests.support.common import SPECTRUM_FILES
from tests.support.fakes import OUT, FakeConsumer, FakeProducer, fake_daemon, fake_messages, fake_packets
from tests.support.golden import added_optional_fields, plain_json, schema_fields
from tests.support.harness import drain

GOLDEN = Path(__file__).parent / "data" / "golden"
FRAMINGS: tuple[Framing, ...] = ("schemaless", "confluent", "container")
NEW_COLUMNS = ("z_network", "template_object", "template_type", "template_phase", "template_r", "confident",
               "out_of_distribution")
LATER_COLUMNS = ("called_class",)  # migration 0004 (schema 1.2): tests/test_outputs_v1_2.py


def _golden(name: str, version: str, suffix: str) -> Path:
    return GOLDEN / f"{name}_v{version.replace('.', '_')}.{suffix}"


# ------------------------------------------------------------------------------------------- the contract: 1.1 vs 1.0


@pytest.mark.parametrize("name", schemas.SCHEMA_NAMES)
def test_1_1_only_adds_optional_fields_to_1_0(name: str) -> None:
    added = added_optional_fields(name, "1.0", "1.1")
    assert added == ({"confident", "redshift.z_network", "redshift.template"}
                     if name == schemas.ANNOTATED_SPECTRUM else set())


@pytest.mark.parametrize("framing", FRAMINGS)
def test_1_1_bytes_decode_with_the_1_0_reader(framing: Framing) -> None:
    data = _golden(schemas.ANNOTATED_SPECTRUM, "1.1", f"{framing}.avro").read_bytes()
    written = json.loads(_golden(schemas.ANNOTATED_SPECTRUM, "1.1", "json").read_text())
    assert written["redshift"]["method"] == "template" and written["redshift"]["template"] is not None
    as_1_0 = Codec(schemas.ANNOTATED_SPECTRUM, version="1.0").decode(data)
    reader_fields = schema_fields(schemas.raw_schema(schemas.ANNOTATED_SPECTRUM, "1.0"))
    assert sorted(as_1_0) == sorted(f["name"] for f in schemas.raw_schema(schemas.ANNOTATED_SPECTRUM, "1.0")["fields"])
    assert "confident" not in as_1_0 and set(as_1_0["redshift"]) == {"z", "z_err", "method"}
    leaves = [p for p in reader_fields if not any(q.startswith(p + ".") for q in reader_fields)]
    for path in leaves:  # every field 1.0 knows has the value the 1.1 producer wrote
        got, want = plain_json(as_1_0), written
        for part in path.split("."):
            got, want = got[part], want[part]
        assert got == want, path
    assert as_1_0["redshift"]["method"] == "template"  # a string in 1.0 too: a new value, not a broken enum


@pytest.mark.parametrize("framing", FRAMINGS)
def test_1_0_bytes_decode_with_the_1_1_reader_with_nulls_for_the_new_fields(framing: Framing) -> None:
    data = _golden(schemas.ANNOTATED_SPECTRUM, "1.0", f"{framing}.avro").read_bytes()
    written = json.loads(_golden(schemas.ANNOTATED_SPECTRUM, "1.0", "json").read_text())
    as_1_1 = plain_json(Codec(schemas.ANNOTATED_SPECTRUM, version="1.1").decode(data))
    assert as_1_1["confident"] is None
    assert as_1_1["redshift"] == {**written["redshift"], "z_network": None, "template": None}
    assert {k: v for k, v in as_1_1.items() if k not in ("confident", "redshift")} == \
        {k: v for k, v in written.items() if k != "redshift"}
    # and the database row of such a record leaves the 0003 columns null, except the flag, which 1.0 never raised
    row = db.classification_rows({"spectrum_id": "s", "revision": 0, "object_id": "o", "survey": "ZTF",
                                  "instrument": "SEDM", "obs_mjd": 1.0, "wavelength": [1.0]},
                                 Codec(schemas.ANNOTATED_SPECTRUM).decode(data)).classification
    assert {c: row[c] for c in NEW_COLUMNS} == {**{c: None for c in NEW_COLUMNS}, "out_of_distribution": False}


def test_the_schemaless_framing_reads_each_version_with_its_own_writer_schema() -> None:
    """Schemaless bytes carry no schema: the codec takes the writer schema from their first field, schema_version."""
    for writer in ("1.0", "1.1"):
        data = _golden(schemas.ANNOTATED_SPECTRUM, writer, "schemaless.avro").read_bytes()
        for reader in ("1.0", "1.1"):
            record = Codec(schemas.ANNOTATED_SPECTRUM, version=reader).decode(data)
            assert record["schema_version"] == writer
            assert ("confident" in record) == (reader == "1.1")


def test_1_1_keeps_its_own_bundled_ids() -> None:
    ids = dict(schemas.BUNDLED_SCHEMA_IDS)
    assert ids[1] == (schemas.SPECTRUM_PACKET, "1.0") and ids[2] == (schemas.ANNOTATED_SPECTRUM, "1.0")  # kept
    assert ids[3] == (schemas.SPECTRUM_PACKET, "1.1") and ids[4] == (schemas.ANNOTATED_SPECTRUM, "1.1")
    data = _golden(schemas.ANNOTATED_SPECTRUM, "1.1", "confluent.avro").read_bytes()
    assert int.from_bytes(data[1:5], "big") == 4


# ----------------------------------------------------------------------------------------------- the record


@pytest.fixture(scope="module")
def shipped() -> Checkpoint:
    return load_checkpoint()


@pytest.fixture(scope="module")
def bank(shipped: Checkpoint) -> TemplateBank:
    found = resolve_template_bank(TEMPLATES_DEFAULT, shipped)
    assert found is not None
    return found


def _calibrated(checkpoint: Checkpoint, *, threshold: float = 0.5, ood_bias: float = 0.0) -> Checkpoint:
    """``checkpoint`` with every class confident at ``threshold`` and a linear OOD score on the mean input flux."""
    n = checkpoint.model_config.n_bins
    ood = OutOfDistribution(mean=np.zeros(n), scale=np.ones(n), weights=np.full(n, 1.0 / n), bias=ood_bias,
                            threshold=0.5)
    return dataclasses.replace(checkpoint, calibration=Calibration(thresholds={c: threshold for c in CLASSES},
                                                                   target_purity={c: 0.9 for c in CLASSES}, ood=ood))


def _prediction(**changes: Any) -> Prediction:
    probs = {c: (0.92 if c == "Ia" else 0.01) for c in CLASSES}
    base = Prediction(probabilities=probs, top_class="Ia", top_probability=0.92, z=0.031, z_err=0.002, ood_score=0.1,
                      z_network=0.05, z_method="template",
                      template=TemplateMatch(object="sn2011fe", type="Ia-norm", phase=5.0, r=11.5, rlap=9.0),
                      confident=True, out_of_distribution=False)
    return dataclasses.replace(base, **changes)


def _annotate(prediction: Prediction, model: Checkpoint, **packet_changes: Any) -> tuple[dict, dict]:
    packet = {**fake_packets(1)[0], **packet_changes}
    prepared = prepare_packet(packet, model.preprocess)
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    record = build_annotation(packet, prepared, prediction, model, source=Source("spectra", 0, 7), consumed_at=now,
                              classified_at=now)
    return packet, record


def test_a_refined_redshift_is_method_template_with_the_network_z_and_the_template(shipped) -> None:
    _, record = _annotate(_prediction(), shipped)
    assert record["schema_version"] == schemas.SCHEMA_VERSION and record["confident"] is True
    assert record["redshift"] == {"z": 0.031, "z_err": 0.002, "method": "template", "z_network": 0.05,
                                  "template": {"object": "sn2011fe", "type": "Ia-norm", "phase": 5.0, "r": 11.5}}
    assert OUT_OF_DISTRIBUTION not in record["quality"]["flags"]
    assert Codec(schemas.ANNOTATED_SPECTRUM).decode(Codec(schemas.ANNOTATED_SPECTRUM).encode(record)) == record


def test_network_only_prior_unknown_phase_and_out_of_distribution(shipped) -> None:
    _, record = _annotate(_prediction(z=0.05, z_method="network", template=None, confident=None,
                                      out_of_distribution=True), shipped)
    assert record["redshift"] == {"z": 0.05, "z_err": 0.002, "method": "model", "z_network": 0.05, "template": None}
    assert record["confident"] is None and record["quality"]["flags"].count(OUT_OF_DISTRIBUTION) == 1
    no_phase = _prediction(template=TemplateMatch(object="sn1999em", type="IIP", phase=math.nan, r=6.0, rlap=4.0))
    packet, record = _annotate(no_phase, shipped, redshift_prior={"z": 0.02, "z_err": 0.001, "origin": "host"})
    assert record["redshift"]["method"] == "prior" and record["redshift"]["z"] == 0.02  # the prior still wins
    assert record["redshift"]["z_network"] == 0.05 and record["redshift"]["template"]["phase"] is None
    row = db.classification_rows(packet, record).classification
    assert (row["z"], row["z_method"], row["z_network"]) == (0.02, "prior", 0.05)
    assert (row["template_object"], row["template_type"], row["template_phase"], row["template_r"]) == \
        ("sn1999em", "IIP", None, 6.0)
    assert (row["confident"], row["out_of_distribution"]) == (True, False)


def test_a_bank_whose_names_do_not_fit_the_columns_is_refused(bank) -> None:
    check_template_bank(bank)  # the shipped one fits
    long_name = "x" * (TEMPLATE_STRING_LIMITS["object"] + 1)
    renamed = dataclasses.replace(bank, objects=(long_name, *bank.objects[1:]))
    with pytest.raises(ConfigError, match="longer than 64"):
        check_template_bank(renamed)
    for column, limit in (("template_object", "object"), ("template_type", "type")):
        column_type = db.classifications.c[column].type
        assert isinstance(column_type, sa.String) and column_type.length == TEMPLATE_STRING_LIMITS[limit]


# ------------------------------------------------------------------------------------------------ the migration


def _columns(engine: sa.Engine, table: str) -> list[str]:
    return [c["name"] for c in sa.inspect(engine).get_columns(table)]


def _a_row_at_0002(engine: sa.Engine) -> None:
    """One spectrum and classification written with the columns 0002 has (what a 1.0 daemon stored)."""
    old = [c for c in db.classifications.c if c.name not in NEW_COLUMNS + LATER_COLUMNS]
    now = datetime(2026, 11, 30, tzinfo=timezone.utc)
    with engine.begin() as conn:
        conn.execute(db.spectra.insert().values(spectrum_id="s1", revision=0, object_id="o1", survey="ZTF",
                                                instrument="SEDM", obs_mjd=60000.0, n_pixels=10, produced_at=now,
                                                received_at=now))
        values = dict(spectrum_id="s1", revision=0, model_name="m", model_version="1", annotation_id="a" * 36,
                      object_id="o1", probabilities={"Ia": 1.0}, top_class="Ia", top_probability=1.0, z=0.1,
                      z_err=0.01, z_method="model", coverage_fraction=1.0, median_snr=10.0, ood_score=0.1, flags=[],
                      processed_at=now, source_topic="t", source_partition=0, source_offset=0)
        table = sa.table("classifications", *[sa.column(c.name, c.type) for c in old])
        conn.execute(sa.insert(table).values(values))


def _check_up_and_down(url: str) -> None:
    db.upgrade(url, "0002")
    engine = db.create_engine(url)
    try:
        _a_row_at_0002(engine)
        assert not set(NEW_COLUMNS) & set(_columns(engine, "classifications"))
        db.upgrade(url)
        assert set(NEW_COLUMNS) <= set(_columns(engine, "classifications"))
        for view in ("latest_classification_per_spectrum", "latest_classification_per_object"):
            assert set(NEW_COLUMNS) <= set(_columns(engine, view)), view  # the views see the new columns
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT * FROM latest_classification_per_object")).mappings().one()
        assert row["spectrum_id"] == "s1" and all(row[c] is None for c in NEW_COLUMNS)  # old rows: null
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE classifications SET confident = :t, template_object = 'sn2011fe'"),
                         {"t": True})
            got = conn.execute(sa.text("SELECT object_id FROM latest_classification_per_spectrum "
                                       "WHERE confident AND template_object = 'sn2011fe'")).scalars().all()
        assert got == ["o1"]
        db.downgrade(url, "0002")
        assert not set(NEW_COLUMNS) & set(_columns(engine, "classifications"))
        with engine.connect() as conn:  # the row survives, the views work again
            assert conn.execute(sa.text("SELECT top_class FROM latest_classification_per_object")).scalar_one() == "Ia"
            assert conn.execute(sa.text("SELECT count(*) FROM class_changes_between_models")).scalar_one() == 0
        db.upgrade(url)
        assert set(NEW_COLUMNS) <= set(_columns(engine, "latest_classification_per_spectrum"))
    finally:
        engine.dispose()


def test_migration_0003_up_and_down_on_sqlite(tmp_path) -> None:
    _check_up_and_down(f"sqlite:///{tmp_path / 'm.sqlite'}")


@pytest.mark.integration
def test_migration_0003_up_and_down_on_postgresql_keeps_the_grants_on_the_views(database_url) -> None:
    _check_up_and_down(database_url)
    role = f"reader_{abs(hash(database_url)) % 10**8}"
    owner = sa.create_engine(database_url)
    try:
        with owner.begin() as conn:
            conn.execute(sa.text(f"CREATE ROLE {role}"))
        db.grant_least_privilege(owner, role)

        def can_read_views() -> list[bool]:
            with owner.connect() as conn:
                return [conn.execute(sa.text(f"SELECT has_table_privilege('{role}', '{v}', 'SELECT')")).scalar_one()
                        for v in db.READ_ONLY if v != "alembic_version"]

        assert can_read_views() == [True, True, True]
        db.downgrade(database_url, "0002")
        assert can_read_views() == [True, True, True]
        db.upgrade(database_url)
        assert can_read_views() == [True, True, True]
        assert db.least_privilege_grants(role)[1].endswith(f"TO {role}")  # the tables' grant covers new columns
    finally:
        with owner.begin() as conn:
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
            conn.execute(sa.text(f"DROP ROLE {role}"))
        owner.dispose()


# ------------------------------------------------------------------------------------------------- the daemon


def _check_rows_against_records(rows: list[dict], records: list[dict], model: Checkpoint) -> None:
    by_id = {r["spectrum_id"]: r for r in rows}
    assert len(by_id) == len(records) > 0
    threshold = model.calibration.thresholds[CLASSES[0]]
    for a in records:
        assert a["schema_version"] == schemas.SCHEMA_VERSION
        row, z = by_id[a["spectrum_id"]], a["redshift"]
        assert row["z"] == pytest.approx(z["z"]) and row["z_method"] == z["method"]
        assert row["z_network"] == pytest.approx(z["z_network"])
        assert row["confident"] is a["confident"] is (a["top_probability"] >= threshold)
        assert row["out_of_distribution"] is (OUT_OF_DISTRIBUTION in a["quality"]["flags"])
        assert row["called_class"] == a["called_class"] in CLASSES  # since 1.2 (tests/test_outputs_v1_2.py)
        if z["method"] == "template":
            t = z["template"]
            assert (row["template_object"], row["template_type"]) == (t["object"], t["type"])
            assert row["template_phase"] == pytest.approx(t["phase"]) and row["template_r"] == pytest.approx(t["r"])
        else:
            assert z["method"] == "model" and z["template"] is None and row["template_object"] is None
            assert z["z"] == z["z_network"]
    methods = {a["redshift"]["method"] for a in records}
    assert methods == {"template", "model"}, methods  # both paths taken on these real spectra
    assert {a["confident"] for a in records} == {True, False}
    assert {row["out_of_distribution"] for row in rows} == {True, False}


def _ood_bias_at_median(model: Checkpoint, packets: list[dict]) -> float:
    """The OOD bias that puts half of ``packets`` out of distribution (the median of their mean input flux)."""
    means = [prepare_packet(p, model.preprocess).model_input()[0].mean() for p in packets]
    return -float(np.median(means))


def test_the_daemon_writes_the_new_columns_and_publishes_them(shipped, bank, tmp_path) -> None:
    msgs, good, _ = fake_messages(12)
    model = _calibrated(shipped, threshold=0.6, ood_bias=_ood_bias_at_median(shipped, good))
    engine = InferenceEngine(model, device="cpu", templates=bank)
    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    db.upgrade(url)
    database = db.create_engine(url)
    producer = FakeProducer()
    stats = fake_daemon(FakeConsumer(msgs), producer, database, engine).run(max_messages=len(msgs))
    assert stats.classified == 12
    with database.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(db.classifications)).mappings()]
    records = [Codec(schemas.ANNOTATED_SPECTRUM).decode(m["value"]) for m in producer.on(OUT)]
    _check_rows_against_records(rows, records, model)
    # and a 1.0 subscriber still reads what was published
    old = [Codec(schemas.ANNOTATED_SPECTRUM, version="1.0").decode(m["value"]) for m in producer.on(OUT)]
    assert [a["redshift"]["z"] for a in old] == [a["redshift"]["z"] for a in records]


@pytest.mark.integration
def test_the_daemon_on_kafka_and_postgresql_stores_and_publishes_the_new_outputs(kafka, database_url, topic_prefix,
                                                                                   shipped, tmp_path) -> None:
    """The real ``build_daemon`` with its default ``model.templates`` (the shipped bank) and a calibrated model."""
    paths = SPECTRUM_FILES[:30]
    packets = fake_packets(30)
    model = _calibrated(shipped, threshold=0.6, ood_bias=_ood_bias_at_median(shipped, packets))
    path = tmp_path / "spectranet-sedm-0.3.1-calibrated.safetensors"
    save_checkpoint(model.build_model(), path, name="spectranet-sedm-calibrated", version="0.3.1",
                    taxonomy=model.taxonomy, preprocess=model.preprocess, temperature=model.temperature,
                    calibration=model.calibration)
    from spectranet.streamer.config import load_settings
    from spectranet.streamer.runtime.kafka_io import ensure_topics

    settings = load_settings(
        kafka={"bootstrap_servers": kafka.bootstrap_servers, "group_id": f"{topic_prefix}-g",
               "input_topics": [f"{topic_prefix}-in"], "output_topic": f"{topic_prefix}-out",
               "session_timeout_ms": 6000},
        database={"url": database_url}, batch={"max_packets": 16, "max_wait_s": 0.5},
        model={"path": path, "device": "cpu"})
    assert settings.model.templates == ""  # the default: the shipped bank
    k = settings.kafka
    ensure_topics(k, [*k.input_topics, k.output_topic, k.dead_letter_topic])
    n, errors = publish_files(paths, topic=k.input_topics[0], bootstrap_servers=kafka.bootstrap_servers)
    assert (n, errors) == (30, [])
    stats = build_daemon(settings, serve_metrics=False).run(max_messages=30, idle_timeout_s=90)
    assert stats.classified == 30
    with sa.create_engine(database_url).connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(db.classifications)).mappings()]
        confident = conn.execute(sa.text("SELECT count(*) FROM latest_classification_per_object WHERE confident "
                                         "AND NOT out_of_distribution")).scalar_one()
    records = [Codec(schemas.ANNOTATED_SPECTRUM).decode(m.value()) for m in drain(kafka.bootstrap_servers,
                                                                                    k.output_topic, 30)]
    _check_rows_against_records(rows, records, load_checkpoint(path))
    assert 0 < confident < 30
