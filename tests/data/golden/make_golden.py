"""Write the golden samples of the current schema version: python tests/data/golden/make_golden.py [--force]

For each schema in ``spectranet.schemas.SCHEMA_NAMES`` at ``SCHEMA_VERSION`` it writes
``<schema>_v<major>_<minor>.{schemaless,confluent,container}.avro`` (the record in each framing the codec writes) and
``<schema>_v<major>_<minor>.json`` (the record as plain JSON; timestamps as epoch milliseconds, as on the wire).

* ``spectrum_packet``: a real SEDM spectrum (2019dwa, slsne package, MIT) read from ``tests/data/spectra/``.
* ``annotated_spectrum``: what the daemon publishes for that packet: ``prepare_packet``, the shipped model with the
  shipped template bank (the daemon's default ``model.templates``) and ``build_annotation``, with fixed timestamps and
  source coordinates.

Golden samples are history, not fixtures: the files of a version, once committed, record what producers of that
version wrote, and ``tests/test_schema_versions.py`` checks that every version's files still decode and re-encode
byte for byte. So existing files are left alone; ``--force`` rewrites them (only while a version is unreleased).
Older versions' files are never regenerated: this script only knows how to build records of the current version.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root: tests.support

from spectranet.schemas import ANNOTATED_SPECTRUM, SCHEMA_NAMES, SCHEMA_VERSION, SPECTRUM_PACKET
from spectranet.streamer.contract.annotate import Source, build_annotation
from spectranet.streamer.contract.codec import Codec, Framing
from spectranet.streamer.contract.packets import prepare_packet
from spectranet.streamer.contract.readers import read_spectrum
from spectranet.streamer.science.checkpoint import load_checkpoint
from spectranet.streamer.science.inference import TEMPLATES_DEFAULT, InferenceEngine, resolve_template_bank
from spectranet.streamer.tools.files import packet_from_file

from tests.support.golden import plain_json

HERE = Path(__file__).parent
SOURCE = HERE.parent / "spectra" / "2019dwa_TNS_ZTF_SEDM_2019.0514.txt"
FRAMINGS: tuple[Framing, ...] = ("schemaless", "confluent", "container")


def golden_packet() -> dict[str, Any]:
    packet = packet_from_file(read_spectrum(SOURCE), survey="ZTF", produced_at_ms=1_700_000_000_000)
    packet.update(tns_name="2019dwa", candid=1234567890123456789 % (2**63), ra=200.1234, dec=-12.5,
                  resolving_power=100.0, exptime=1800.0, origin="pysedm 0.27")
    return packet


def golden_annotation() -> dict[str, Any]:
    packet = golden_packet()
    model = load_checkpoint()
    prepared = prepare_packet(packet, model.preprocess)
    engine = InferenceEngine(model, device="cpu", warmup=False,
                             templates=resolve_template_bank(TEMPLATES_DEFAULT, model))
    (prediction,) = engine.predict([prepared])
    return build_annotation(packet, prepared, prediction, model,
                            source=Source(topic="spectra", partition=3, offset=41_207),
                            consumed_at=datetime(2023, 11, 14, 22, 13, 20, 250_000, tzinfo=timezone.utc),
                            classified_at=datetime(2023, 11, 14, 22, 13, 20, 312_000, tzinfo=timezone.utc))


BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {SPECTRUM_PACKET: golden_packet,
                                                     ANNOTATED_SPECTRUM: golden_annotation}


def stem(name: str, version: str) -> str:
    return f"{name}_v{version.replace('.', '_')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--force", action="store_true", help="rewrite files that exist (unreleased versions only)")
    args = parser.parse_args()
    missing = set(SCHEMA_NAMES) - set(BUILDERS)
    if missing:
        raise SystemExit(f"no golden record builder for {sorted(missing)}: add one to BUILDERS")
    for name in SCHEMA_NAMES:
        base = stem(name, SCHEMA_VERSION)
        targets = [HERE / f"{base}.{f}.avro" for f in FRAMINGS] + [HERE / f"{base}.json"]
        if not args.force and all(t.exists() for t in targets):
            print(f"{base}: kept (exists; --force rewrites it)")
            continue
        record = BUILDERS[name]()
        codec = Codec(name, version=SCHEMA_VERSION)
        for framing, target in zip(FRAMINGS, targets):
            target.write_bytes(codec.encode(record, framing=framing))
        targets[-1].write_text(json.dumps(plain_json(record), indent=1) + "\n")
        print(f"{base}: wrote {', '.join(t.name for t in targets)}")


if __name__ == "__main__":
    main()
