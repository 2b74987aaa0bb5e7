"""``spectranet demo`` end to end, as a new user runs it: a subprocess on embedded defaults (tansu, SQLite)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from spectranet.streamer.contract.readers import read_spectrum
from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.streamer.tools.demo import SQL_EXAMPLES, sample_paths
from spectranet.streamer.tools.files import packet_from_file

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("demo") / "spectranet-demo"
    # Embedded defaults only: no configured broker, database, config file or raw Kafka client properties.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECTRANET_", "KAFKA_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "spectranet.streamer.cli", "demo", "--output", str(out)],
                          cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    return proc, out


@pytest.fixture(scope="module")
def samples() -> dict[str, tuple[str | None, str | None]]:
    """spectrum_id -> (object_id, reported type) of every bundled sample, computed independently of the demo."""
    found: dict[str, tuple[str | None, str | None]] = {}
    for path in sample_paths():
        sf = read_spectrum(path)
        found[packet_from_file(sf)["spectrum_id"]] = (sf.object_id, sf.label)
    return found


def _rows(db: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT spectrum_id, object_id, top_class, top_probability, called_class "
                            "FROM classifications").fetchall()
    finally:
        conn.close()


def test_demo_exits_cleanly(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, _ = demo
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "started the embedded tansu broker" in proc.stdout
    assert "36 classified, 0 dead-lettered" in proc.stdout


def test_database_holds_one_classification_per_sample(demo: tuple[subprocess.CompletedProcess[str], Path],
                                                      samples: dict[str, tuple[str, str | None]]) -> None:
    _, out = demo
    assert len(samples) == 36
    rows = _rows(out / "spectranet.sqlite")
    assert len(rows) == 36
    assert {r["spectrum_id"] for r in rows} == set(samples)
    assert {r["object_id"] for r in rows} == {obj for obj, _ in samples.values()}


def test_table_has_a_row_per_sample_with_reported_and_predicted_class(
        demo: tuple[subprocess.CompletedProcess[str], Path], samples: dict[str, tuple[str, str | None]]) -> None:
    proc, out = demo
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("object") and "reported" in line)
    assert "predicted" in lines[header]
    table = lines[header + 1:header + 1 + 36]
    for row in _rows(out / "spectranet.sqlite"):
        obj, reported = samples[row["spectrum_id"]]
        name = obj[:31]
        matches = [line for line in table if line.startswith(name + " ")]
        assert len(matches) == 1, f"{obj}: {matches}"
        # object, reported type, predicted class, its probability, confident, the class called down the tree (then
        # reported z and predicted z±err)
        pattern = (rf"\s+{re.escape(reported or '?')}\s+{re.escape(row['top_class'])}\s+{row['top_probability']:.2f}"
                   rf"\s+(yes|no|-)\s+{re.escape(row['called_class'])}\s")
        assert re.match(pattern, matches[0][len(name):]), matches[0]


def test_printed_sql_runs_on_the_demo_database(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = demo
    assert "latest_classification_per_object" in proc.stdout
    assert 'Codec("annotated_spectrum")' in proc.stdout  # the subscriber snippet
    conn = sqlite3.connect(out / "spectranet.sqlite")
    try:
        statements = [s for s in SQL_EXAMPLES.split(";") if s.strip()]
        latest = conn.execute(statements[0]).fetchall()
        assert len(latest) == 36  # one spectrum per object among the samples
        called = dict(conn.execute(statements[1]).fetchall())  # objects per called class
        assert sum(called.values()) == 36 and set(called) <= set(CLASSES)
        for statement in statements[2:]:
            conn.execute(statement).fetchall()
    finally:
        conn.close()


def test_overview_png_is_written(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = demo
    png = out / "overview.png"
    assert png.is_file()
    assert png.read_bytes()[:8] == PNG_SIGNATURE
