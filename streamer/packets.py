"""Spectrum packets: the contract's rules beyond Avro types, and building packets from spectrum files.

Avro guarantees types; ``validate_packet`` guarantees meaning (parallel arrays, coordinate ranges, enumerations,
resource limits), raising ``ValidationError`` that names the field and the packet.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamer.errors import ValidationError
from streamer.readers import SpectrumFile

__all__ = ["Limits", "validate_packet", "packet_from_file", "spectrum_id_for"]

FRAMES = frozenset({"observed", "rest"})
MEDIA = frozenset({"air", "vacuum"})
SPECTRUM_TYPES = frozenset({"source", "host", "sky", "standard", "other"})


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 100_000
    max_header_cards: int = 1_000
    max_header_bytes: int = 256 * 1024


def validate_packet(p: Mapping[str, Any], limits: Limits = Limits()) -> None:
    pid = str(p.get("spectrum_id") or "<no spectrum_id>")

    def fail(field: str, message: str) -> None:
        raise ValidationError(message, field=field, packet_id=pid)

    for name in ("spectrum_id", "object_id", "instrument", "survey"):
        if not str(p.get(name) or "").strip():
            fail(name, "must be a non-empty string")
    if p["revision"] < 0:
        fail("revision", f"must be >= 0, got {p['revision']}")
    n = len(p["wavelength"])
    if n == 0:
        fail("wavelength", "is empty")
    if n > limits.max_pixels:
        fail("wavelength", f"has {n} pixels, more than the limit of {limits.max_pixels}")
    for name in ("flux", "flux_err", "mask"):
        arr = p.get(name)
        if arr is not None and len(arr) != n:
            fail(name, f"has {len(arr)} values but wavelength has {n}")
    if p.get("ra") is not None and not (0.0 <= p["ra"] < 360.0):
        fail("ra", f"must be in [0, 360) deg, got {p['ra']}")
    if p.get("dec") is not None and not (-90.0 <= p["dec"] <= 90.0):
        fail("dec", f"must be in [-90, 90] deg, got {p['dec']}")
    if not math.isfinite(p["obs_mjd"]):
        fail("obs_mjd", f"must be finite, got {p['obs_mjd']}")
    if p["wavelength_frame"] not in FRAMES:
        fail("wavelength_frame", f"must be one of {sorted(FRAMES)}, got {p['wavelength_frame']!r}")
    if p["wavelength_medium"] not in MEDIA:
        fail("wavelength_medium", f"must be one of {sorted(MEDIA)}, got {p['wavelength_medium']!r}")
    if p["spectrum_type"] not in SPECTRUM_TYPES:
        fail("spectrum_type", f"must be one of {sorted(SPECTRUM_TYPES)}, got {p['spectrum_type']!r}")
    prior = p.get("redshift_prior")
    if prior is not None and not (math.isfinite(prior["z"]) and -0.01 <= prior["z"] <= 20):
        fail("redshift_prior.z", f"must be finite and in [-0.01, 20], got {prior['z']}")
    if p["wavelength_frame"] == "rest" and prior is None:
        fail("redshift_prior", "a rest-frame spectrum needs a redshift_prior to be placed in the observer frame")
    header = p.get("header") or {}
    if len(header) > limits.max_header_cards:
        fail("header", f"has {len(header)} cards, more than the limit of {limits.max_header_cards}")
    if sum(len(k) + len(v) for k, v in header.items()) > limits.max_header_bytes:
        fail("header", f"exceeds {limits.max_header_bytes} bytes")


def spectrum_id_for(object_id: str, wavelength: np.ndarray, flux: np.ndarray) -> str:
    """Stable id from the object and the data, so republishing the same file is recognised as the same spectrum."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(wavelength, dtype="<f8").tobytes())
    h.update(np.ascontiguousarray(flux, dtype="<f8").tobytes())
    return f"{object_id}:{h.hexdigest()[:16]}"


def packet_from_file(sf: SpectrumFile, *, survey: str = "TNS", revision: int = 0,
                     produced_at_ms: int | None = None) -> dict[str, Any]:
    """A spectrum packet (reader-schema dict) for a spectrum read from a file.

    The reported label and redshift stay in the header for bookkeeping; the packet carries a redshift prior only
    for rest-frame data, which cannot be placed on the observer-frame grid without it.
    """
    object_id = sf.object_id or sf.header.get("object") or sf.path.rsplit("/", 1)[-1].split(".")[0]
    header = {k: str(v) for k, v in sf.header.items()}
    prior = None
    if sf.frame == "rest":
        prior = {"z": float(sf.redshift or 0.0), "z_err": None, "origin": "file header"}
    return {
        "schema_version": "1.0",
        "spectrum_id": spectrum_id_for(object_id, sf.wavelength, sf.flux),
        "revision": revision,
        "object_id": object_id,
        "survey": survey,
        "tns_name": None,
        "candid": None,
        "dia_object_id": None,
        "ra": None,
        "dec": None,
        "instrument": sf.instrument or "unknown",
        "telescope": sf.telescope,
        "origin": None,
        "spectrum_type": "source",
        "obs_mjd": float(sf.mjd) if sf.mjd is not None else 0.0,
        "exptime": None,
        "wavelength": sf.wavelength.astype(float).tolist(),
        "flux": sf.flux.astype(float).tolist(),
        "flux_err": None if sf.flux_err is None else sf.flux_err.astype(float).tolist(),
        "mask": None,
        "wavelength_unit": sf.wavelength_unit,
        "flux_unit": sf.flux_unit,
        "wavelength_frame": sf.frame,
        "wavelength_medium": "air",
        "flux_calibrated": sf.flux_calibrated,
        "resolving_power": None,
        "quality_flag": None,
        "redshift_prior": prior,
        "header": header,
        "produced_at": produced_at_ms if produced_at_ms is not None else int(time.time() * 1000),
    }
