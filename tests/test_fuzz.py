"""Fuzzing the packet path: every malformed input is classified or dead-lettered with a reason; nothing crashes.

Hypothesis generates (a) arbitrary bytes in every framing, (b) valid packets with fields mutated to hostile values
(NaN/inf, negative or zero wavelengths, mismatched lengths, huge headers, unknown units, absurd coordinates), and
(c) byte-level corruptions of valid packets. At least 1,000 inputs per run go through the real ``SpectrumClassifier``.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.contract.packets import Limits
from spectranet.streamer.contract.readers import read_spectrum
from spectranet.streamer.errors import PacketError
from spectranet.streamer.runtime.classifier import SpectrumClassifier
from spectranet.streamer.science.checkpoint import load_checkpoint
from spectranet.streamer.science.inference import InferenceEngine
from spectranet.streamer.tools.files import packet_from_file

from tests.support.fakes import FakeMessage

CODEC = Codec("spectrum_packet", max_message_bytes=256 * 1024)
BASE = packet_from_file(read_spectrum(Path(__file__).parent / "data/spectra/2019dwa_TNS_ZTF_SEDM_2019.0514.txt"),
                        produced_at_ms=1_700_000_000_000)
VALID = CODEC.encode(BASE)
SEEN = {"inputs": 0}


@pytest.fixture(scope="module")
def classifier() -> SpectrumClassifier:
    engine = InferenceEngine(load_checkpoint(), device="cpu", warmup=False)
    return SpectrumClassifier(engine, codec=CODEC, limits=Limits(max_pixels=5_000, max_header_cards=50,
                                                                 max_header_bytes=4_096))


def _check(classifier: SpectrumClassifier, values: list[bytes]) -> None:
    msgs = [FakeMessage("fuzz", 0, i, v) for i, v in enumerate(values)]
    out = classifier.execute(msgs, consumed_at=datetime.now(timezone.utc))
    SEEN["inputs"] += len(values)
    assert len(out.classified) + len(out.dead) == len(values)  # nothing lost, nothing doubled
    for d in out.dead:
        assert isinstance(d.error, PacketError) and str(d.error)
        assert d.payload == values[d.source.offset]  # original bytes kept for the dead-letter topic
    for c in out.classified:
        probs = [x["probability"] for x in c.annotation["classifications"]]
        assert all(math.isfinite(p) for p in probs) and abs(sum(probs) - 1) < 1e-4
        assert math.isfinite(c.annotation["redshift"]["z"])
        CODEC_OUT.encode(c.annotation)  # the output contract holds for whatever got through


CODEC_OUT = Codec("annotated_spectrum")
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4),
       st.sampled_from([b"", b"\x00\x00\x00\x00\x01", b"Obj\x01", b"\x06"]))
def test_arbitrary_bytes(classifier, blobs: list[bytes], prefix: bytes) -> None:
    _check(classifier, [prefix + b for b in blobs])


_hostile_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0), st.just(-1.0),
                            st.floats(min_value=-1e30, max_value=1e30))


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    p = dict(BASE)
    n = len(p["wavelength"])
    field = draw(st.sampled_from(["wavelength", "flux", "flux_err", "mask", "units", "coords", "header",
                                  "lengths", "ids", "frame", "prior", "pixels"]))
    if field in ("wavelength", "flux", "flux_err"):
        arr = list(p[field] or p["flux"])
        for _ in range(draw(st.integers(1, 20))):
            arr[draw(st.integers(0, n - 1))] = draw(_hostile_floats)
        p[field] = arr
    elif field == "mask":
        p["mask"] = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    elif field == "units":
        p["wavelength_unit"] = draw(st.sampled_from(["nm", "um", "Hz", "furlong", "", "erg", "Angstrom**2"]))
        p["flux_unit"] = draw(st.sampled_from(["Jy", "mag(AB)", "mag", "W", "", "erg/s/cm2/A", "count", "%%"]))
    elif field == "coords":
        p["ra"], p["dec"], p["obs_mjd"] = draw(_hostile_floats), draw(_hostile_floats), draw(_hostile_floats)
    elif field == "header":
        k = draw(st.integers(0, 200))
        p["header"] = {f"K{i}": "x" * draw(st.integers(0, 100)) for i in range(k)}
    elif field == "lengths":
        cut = draw(st.integers(0, n))
        p[draw(st.sampled_from(["flux", "flux_err", "wavelength"]))] = p["flux"][:cut]
    elif field == "ids":
        p["spectrum_id"] = draw(st.text(max_size=5))
        p["object_id"] = draw(st.text(max_size=5))
    elif field == "frame":
        p["wavelength_frame"] = draw(st.sampled_from(["rest", "observed", "lab", ""]))
        p["wavelength_medium"] = draw(st.sampled_from(["air", "vacuum", "water"]))
    elif field == "prior":
        p["redshift_prior"] = {"z": draw(_hostile_floats), "z_err": None, "origin": None}
    elif field == "pixels":
        m = draw(st.integers(0, 6000))
        p["wavelength"] = np.linspace(3000, 10000, m).tolist()
        p["flux"] = np.ones(m).tolist()
        p["flux_err"] = None
    return CODEC.encode(p, framing=draw(st.sampled_from(["schemaless", "confluent", "container"])))


@FAST
@given(st.lists(mutated_packets(), min_size=1, max_size=3))
def test_mutated_packets(classifier, values: list[bytes]) -> None:
    _check(classifier, values)


@FAST
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)))
def test_corrupted_bytes(classifier, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(VALID)
    for pos, byte in flips:
        data[pos] = byte
    _check(classifier, [bytes(data), bytes(data[:cut]), VALID])


def test_limits_are_enforced_with_clear_errors(classifier) -> None:
    too_many = dict(BASE, wavelength=np.linspace(3000, 10000, 6000).tolist(), flux=np.ones(6000).tolist(),
                    flux_err=None)
    big_header = dict(BASE, header={f"K{i}": "v" for i in range(51)})
    out = classifier.execute([FakeMessage("t", 0, 0, CODEC.encode(too_many)),
                              FakeMessage("t", 0, 1, CODEC.encode(big_header)),
                              FakeMessage("t", 0, 2, b"\x06" * (256 * 1024 + 1))],
                             consumed_at=datetime.now(timezone.utc))
    reasons = [(d.error.field, str(d.error)) for d in out.dead]
    assert [f for f, _ in reasons] == ["wavelength", "header", "value"]
    assert "6000 pixels" in reasons[0][1] and "51 cards" in reasons[1][1] and "exceeds the limit" in reasons[2][1]


def test_at_least_a_thousand_inputs_were_fuzzed() -> None:
    """Runs after the property tests in this module (pytest keeps file order)."""
    assert SEEN["inputs"] >= 1000, SEEN
