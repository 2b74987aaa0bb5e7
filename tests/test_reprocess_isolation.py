"""``spectranet reprocess`` isolates a row the database refuses, as the daemon does (``daemon.store_isolating``).

Against a real PostgreSQL (the refusal is the database's own: a column narrower than the contract, altered by hand
after the packets were stored): the refused spectrum is counted as failed and logged with its id and the column, the
rest of its batch is written, and the run goes on to the end without an exception. An infrastructure failure still
stops the run.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.classifier import SpectrumClassifier, StoredMessage
from spectranet.streamer.science.checkpoint import load_checkpoint
from spectranet.streamer.science.inference import InferenceEngine

from tests.support.fakes import IN, fake_packets

WIDE = "I" * 100  # the contract allows 128 characters; the altered column below holds 16


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine(load_checkpoint(), device="cpu", warmup=False)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> SpectrumClassifier:
    from spectranet.training.export import export_untrained

    folder = tmp_path_factory.mktemp("models")
    other = export_untrained(folder, seed=1, version="9.0.0")
    return SpectrumClassifier(InferenceEngine(load_checkpoint(folder / f"spectranet-sedm-{other.version}"),
                                              device="cpu", warmup=False), codec=Codec("spectrum_packet"))


def _store(database: sa.Engine, engine: InferenceEngine, packets: list[dict]) -> None:
    """Classify and store ``packets`` with their bytes (``database.store_arrays``), as the daemon would."""
    codec = Codec("spectrum_packet")
    classifier = SpectrumClassifier(engine, codec=codec, store_raw_packets=True)
    messages = [StoredMessage(IN, 0, i, codec.encode(p)) for i, p in enumerate(packets)]
    outcome = classifier.execute(messages, consumed_at=datetime.now(timezone.utc))
    assert outcome.dead == []
    db.write_batch(database, [c.rows for c in outcome.classified])


@pytest.mark.integration
@pytest.mark.parametrize("batch_size", [256, 2])
def test_reprocess_counts_a_refused_row_as_failed_and_writes_the_rest(
        database_url: str, engine: InferenceEngine, other_model: SpectrumClassifier, batch_size: int,
        caplog: pytest.LogCaptureFixture) -> None:
    from spectranet.streamer.tools.reprocess import reprocess

    db.upgrade(database_url)
    database = db.create_engine(database_url)
    packets = fake_packets(6)
    bad = packets[3] = dict(packets[3], instrument=WIDE)
    _store(database, engine, packets)
    with database.begin() as conn:  # narrower than the contract: the stored row is cut, its packet is not
        conn.execute(sa.text("ALTER TABLE spectra ALTER COLUMN instrument TYPE varchar(16) USING left(instrument, 16)"))

    with caplog.at_level(logging.WARNING):
        counts = reprocess(database, other_model, batch_size=batch_size)

    assert counts == (len(packets) - 1, 1)
    with database.connect() as conn:
        rows = conn.execute(sa.select(db.classifications.c.spectrum_id, db.classifications.c.model_version)).all()
        dead = conn.execute(sa.select(sa.func.count()).select_from(db.dead_letters)).scalar_one()
    new = other_model.model.version
    assert sorted(sid for sid, version in rows if version == new) == sorted(
        p["spectrum_id"] for p in packets if p is not bad)
    assert sorted(sid for sid, version in rows if version != new) == sorted(p["spectrum_id"] for p in packets)
    assert dead == 0  # counted and logged, not dead-lettered (see the reprocess module's docstring)
    refused = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(refused) == 1
    assert bad["spectrum_id"] in refused[0] and "'instrument'" in refused[0] and "value too long" in refused[0]

    # Idempotent, and still isolating: the good rows are there already, the bad one is refused again.
    assert reprocess(database, other_model, batch_size=batch_size) == (len(packets) - 1, 1)


def test_reprocess_still_raises_for_the_infrastructures_failures(
        engine: InferenceEngine, other_model: SpectrumClassifier, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from spectranet.streamer.tools.reprocess import reprocess

    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    db.upgrade(url)
    database = db.create_engine(url)
    _store(database, engine, fake_packets(3))

    def lost(*_args: object, **_kwargs: object) -> None:
        raise sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(db, "write_batch", lost)
    with pytest.raises(sa.exc.OperationalError):
        reprocess(database, other_model)
