"""Spectrum packets: the contract's rules beyond Avro types, and building packets from spectrum files.

Avro guarantees types; ``validate_packet`` guarantees meaning (parallel arrays, coordinate ranges, enumerations,
resource limits), raising ``ValidationError`` that names the field and the packet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from spectranet.streamer.errors import PacketError, ValidationError
from spectranet.streamer.science.preprocess import Prepared, PreprocessConfig, prepare

__all__ = ["Limits", "validate_packet", "prepare_packet"]

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


def prepare_packet(packet: Mapping[str, Any], config: PreprocessConfig, limits: Limits = Limits()) -> Prepared:
    """Validate a decoded packet and put it on the model grid (rest-frame spectra are moved to the observer frame
    with their redshift prior: the model reads observer-frame spectra)."""
    validate_packet(packet, limits)
    prior = packet.get("redshift_prior")
    try:
        return prepare(
            np.asarray(packet["wavelength"], dtype=np.float64), np.asarray(packet["flux"], dtype=np.float64),
            flux_err=None if packet.get("flux_err") is None else np.asarray(packet["flux_err"], dtype=np.float64),
            mask=None if packet.get("mask") is None else np.asarray(packet["mask"], dtype=bool),
            wavelength_unit=packet["wavelength_unit"], flux_unit=packet["flux_unit"],
            medium=packet["wavelength_medium"], flux_calibrated=packet["flux_calibrated"],
            frame=packet["wavelength_frame"], redshift=prior["z"] if prior else None, config=config,
        )
    except PacketError as exc:
        raise exc.with_packet(packet["spectrum_id"]) from exc
