"""Spectrum packets: the contract's rules beyond Avro types, and building packets from spectrum files.

Avro guarantees types; ``validate_packet`` guarantees meaning (parallel arrays, coordinate ranges, enumerations,
resource limits) *and* that whatever passes can be stored and published: every string fits the database column it
goes to and holds only characters PostgreSQL text can hold, every number is finite and in a physical range. It raises
``ValidationError`` naming the field and the packet. The limits live here, once: ``runtime/db.py`` sizes its columns
from ``STRING_LIMITS``, and the schema docs (``schemas/1/0/spectrum_packet.avsc``) quote them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Final

import numpy as np
from spectranet.streamer.errors import PacketError, ValidationError
from spectranet.streamer.science.preprocess import Prepared, PreprocessConfig, prepare

__all__ = ["Limits", "STRING_LIMITS", "IDENTIFIERS", "NUMERIC_RANGES", "PRODUCED_AT_RANGE", "validate_packet",
           "prepare_packet"]

FRAMES = frozenset({"observed", "rest"})
MEDIA = frozenset({"air", "vacuum"})
SPECTRUM_TYPES = frozenset({"source", "host", "sky", "standard", "other"})

STRING_LIMITS: Final[Mapping[str, int]] = MappingProxyType({
    # Stored in the database: the columns of runtime/db.py are these lengths (characters, as PostgreSQL counts).
    "spectrum_id": 256, "object_id": 256, "survey": 64, "tns_name": 64, "instrument": 128,
    # Not stored; bounded so that annotated packets, dead-letter headers and log lines stay small.
    "schema_version": 16, "telescope": 128, "origin": 256, "spectrum_type": 16, "wavelength_unit": 64,
    "flux_unit": 64, "wavelength_frame": 16, "wavelength_medium": 16, "redshift_prior.origin": 256,
})
"""Longest value of each string field, in characters."""

IDENTIFIERS: Final = frozenset({"spectrum_id", "object_id", "survey", "tns_name", "instrument"})
"""String fields stored in indexed columns and used as Kafka keys and in logs: printable characters only."""

NUMERIC_RANGES: Final[Mapping[str, tuple[float, float]]] = MappingProxyType({
    "ra": (0.0, 360.0),                       # [0, 360): 360 itself is 0
    "dec": (-90.0, 90.0),
    "obs_mjd": (0.0, 100_000.0),              # 1858-11-17 .. 2132-08-31; 0 is what files without a date give
    "exptime": (0.0, 1e6),                    # seconds
    "resolving_power": (0.0, 1e7),            # > 0
    "redshift_prior.z": (-0.01, 20.0),
    "redshift_prior.z_err": (0.0, 20.0),
})
"""Closed ranges of the floating-point fields (finite values only), except where the comment says otherwise."""

PRODUCED_AT_RANGE: Final = (datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(2100, 1, 1, tzinfo=timezone.utc))
"""``produced_at`` must lie in [start, end)."""
_PRODUCED_AT_MS: Final = tuple(t.timestamp() * 1000 for t in PRODUCED_AT_RANGE)

_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")  # NUL: PostgreSQL text cannot hold it; lone surrogates: not UTF-8
_NOT_PRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")  # and controls, line breaks


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 100_000
    max_header_cards: int = 1_000
    max_header_bytes: int = 256 * 1024


def _strings(p: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    prior = p.get("redshift_prior") or {}
    return [*((name, p.get(name)) for name in STRING_LIMITS if "." not in name),
            ("redshift_prior.origin", prior.get("origin"))]


def _check_string(name: str, value: str) -> str | None:
    """What is wrong with ``value`` for field ``name``, or None."""
    limit = STRING_LIMITS[name]
    if len(value) > limit:
        return f"has {len(value)} characters, more than the limit of {limit}"
    bad = (_NOT_PRINTABLE if name in IDENTIFIERS else _NOT_TEXT).search(value)
    if bad is not None:
        what = "a NUL character" if bad.group() == "\x00" else f"the character {bad.group()!r}"
        rule = "printable characters only" if name in IDENTIFIERS else "no NUL characters"
        return f"contains {what} at position {bad.start()} ({rule})"
    return None


def validate_packet(p: Mapping[str, Any], limits: Limits = Limits()) -> None:
    pid = str(p.get("spectrum_id") or "<no spectrum_id>")

    def fail(field: str, message: str) -> None:
        raise ValidationError(message, field=field, packet_id=pid)

    for name in ("spectrum_id", "object_id", "instrument", "survey"):
        if not str(p.get(name) or "").strip():
            fail(name, "must be a non-empty string")
    for name, value in _strings(p):
        if value is not None and (problem := _check_string(name, value)) is not None:
            fail(name, problem)
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
    prior = p.get("redshift_prior")
    numbers = {"ra": p.get("ra"), "dec": p.get("dec"), "obs_mjd": p["obs_mjd"], "exptime": p.get("exptime"),
               "resolving_power": p.get("resolving_power"),
               "redshift_prior.z": prior["z"] if prior else None,
               "redshift_prior.z_err": prior.get("z_err") if prior else None}
    for name, value in numbers.items():
        if value is None:
            continue
        low, high = NUMERIC_RANGES[name]
        if not math.isfinite(value):
            fail(name, f"must be finite, got {value}")
        inside = {"ra": low <= value < high, "resolving_power": low < value <= high}.get(name, low <= value <= high)
        if not inside:
            bounds = {"ra": f"[{low:g}, {high:g})", "resolving_power": f"({low:g}, {high:g}]"}.get(
                name, f"[{low:g}, {high:g}]")
            fail(name, f"must be in {bounds}, got {value}")
    produced = p["produced_at"]  # a datetime once decoded; milliseconds in a packet built in memory
    if isinstance(produced, datetime):
        ms = (produced if produced.tzinfo else produced.replace(tzinfo=timezone.utc)).timestamp() * 1000
    else:
        ms = produced
    if not _PRODUCED_AT_MS[0] <= ms < _PRODUCED_AT_MS[1]:
        shown_value = produced.isoformat() if isinstance(produced, datetime) else f"{produced} ms"
        fail("produced_at", f"must be in [{PRODUCED_AT_RANGE[0]:%Y-%m-%d}, {PRODUCED_AT_RANGE[1]:%Y-%m-%d}) UTC, "
                            f"got {shown_value}")
    if p["wavelength_frame"] not in FRAMES:
        fail("wavelength_frame", f"must be one of {sorted(FRAMES)}, got {p['wavelength_frame']!r}")
    if p["wavelength_medium"] not in MEDIA:
        fail("wavelength_medium", f"must be one of {sorted(MEDIA)}, got {p['wavelength_medium']!r}")
    if p["spectrum_type"] not in SPECTRUM_TYPES:
        fail("spectrum_type", f"must be one of {sorted(SPECTRUM_TYPES)}, got {p['spectrum_type']!r}")
    if p["wavelength_frame"] == "rest" and prior is None:
        fail("redshift_prior", "a rest-frame spectrum needs a redshift_prior to be placed in the observer frame")
    header = p.get("header") or {}
    if len(header) > limits.max_header_cards:
        fail("header", f"has {len(header)} cards, more than the limit of {limits.max_header_cards}")
    if sum(len(k) + len(v) for k, v in header.items()) > limits.max_header_bytes:
        fail("header", f"exceeds {limits.max_header_bytes} bytes")
    for key, value in header.items():
        if _NOT_TEXT.search(key) or _NOT_TEXT.search(value):
            fail("header", f"card {key[:40]!r} holds a NUL character or a lone surrogate")


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
