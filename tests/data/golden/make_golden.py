"""Regenerate the golden packets (only when the contract changes on purpose): python tests/data/golden/make_golden.py

A real SEDM spectrum (2019dwa, slsne package, MIT) in each accepted framing, plus the expected decoded record.
"""

from __future__ import annotations

import json
from pathlib import Path

from streamer.codec import Codec
from streamer.packets import packet_from_file
from streamer.readers import read_spectrum

HERE = Path(__file__).parent
SOURCE = HERE.parent / "spectra" / "2019dwa_TNS_ZTF_SEDM_2019.0514.txt"


def golden_packet() -> dict:
    packet = packet_from_file(read_spectrum(SOURCE), survey="ZTF", produced_at_ms=1_700_000_000_000)
    packet.update(tns_name="2019dwa", candid=1234567890123456789 % (2**63), ra=200.1234, dec=-12.5,
                  resolving_power=100.0, exptime=1800.0, origin="pysedm 0.27")
    return packet


def main() -> None:
    codec = Codec("spectrum_packet", version="1.0")
    packet = golden_packet()
    for framing in ("schemaless", "confluent", "container"):
        (HERE / f"spectrum_packet_v1_0.{framing}.avro").write_bytes(codec.encode(packet, framing=framing))
    (HERE / "spectrum_packet_v1_0.json").write_text(json.dumps(packet, indent=1) + "\n")


if __name__ == "__main__":
    main()
