"""Unit strings: the one place that reads them and the one place that converts spectra to Angstrom and F_lambda.

Packets (``preprocess.prepare``) and spectrum files (``contract.readers``) both call this module, so a unit that one
path accepts the other accepts too, spelled the same way.

Why astropy: unit strings in the wild (FITS ``CUNIT1``/``BUNIT`` cards, ``1e-17 erg/s/cm2/Angstrom``, ``mJy``,
``mag(AB)``, ``W/m2/nm``, ``Hz``, ``eV``) are a grammar with SI prefixes, powers, scale factors and function units,
not a fixed list. astropy parses that grammar, knows the FITS and VOUnit spellings, and carries the physics this
needs (the spectral and spectral-density equivalencies, the AB and ST zero points) with constants from CODATA. It
is already a dependency (FITS reading), and the tests check conversions against it. What astropy gets wrong for
spectra is spelling, not physics: ``A`` is an Ampere to it and ``Ang`` is nothing, so the aliases below are
substituted before parsing.

Aliases, two kinds:

- a whole unit string, any case: ``a``/``ang``/``angs``/``angstroms``/``å`` (Angstrom), ``microns``,
  ``nanometers``/``nanometres``, and the synphot flux names ``flam``, ``fnu``, ``photlam``, ``photnu``, ``abmag``,
  ``stmag``;
- an Angstrom spelling inside a compound unit: a bare upper-case ``A`` (``erg/s/cm2/A``; never an Ampere in a
  spectrum) and ``Ang``/``Angs``/``Angstrom``/``Angstroms`` in any case (``erg/s/cm2/Ang``, ``ANGSTROM``).

Flux strings that mean "no physical unit" (``""``, ``arbitrary``, ``counts``, ``normalised``, ...) and units whose
bases are counts, ADU, electrons, seconds or pixels are *arbitrary*: their values pass through unchanged and the
spectrum counts as uncalibrated.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
from astropy import constants as const
from astropy import units as u
from spectranet.streamer.errors import NonPositiveWavelengthError, UnitError

__all__ = ["FLAMBDA", "FluxKind", "FluxUnit", "parse_unit", "flux_unit", "to_angstrom", "to_flambda", "flambda_err"]

FloatArray = np.ndarray  # float64 [n] unless stated
FluxKind = Literal["flambda", "fnu", "photlam", "photnu", "arbitrary"]

FLAMBDA = "erg / (s cm2 Angstrom)"  # the one spelling of calibrated F_lambda that files and packets are given

_WHOLE_ALIASES = {
    "a": "Angstrom", "ang": "Angstrom", "angs": "Angstrom", "angstroms": "Angstrom", "å": "Angstrom",
    "microns": "micron", "nanometers": "nm", "nanometres": "nm",
    "abmag": "mag(AB)", "stmag": "mag(ST)", "flam": FLAMBDA, "fnu": "erg / (s cm2 Hz)",
    "photlam": "ph / (s cm2 Angstrom)", "photnu": "ph / (s cm2 Hz)",
}
_ANGSTROM_WORD = re.compile(r"(?<![A-Za-z])(?:A|(?i:ang|angs|angstrom|angstroms))(?![A-Za-z])")
_ARBITRARY_NAMES = frozenset({"", "dimensionless", "arbitrary", "arb", "arbitrary units", "a.u.", "count", "counts",
                              "normalized", "normalised", "relative", "none"})
_ARBITRARY_BASES = frozenset({u.count, u.adu, u.electron, u.s, u.pix})

_FLAM = u.erg / (u.s * u.cm**2 * u.AA)
_REFERENCES: tuple[tuple[FluxKind, u.UnitBase], ...] = (
    ("flambda", _FLAM),
    ("fnu", u.erg / (u.s * u.cm**2 * u.Hz)),
    ("photlam", u.photon / (u.s * u.cm**2 * u.AA)),
    ("photnu", u.photon / (u.s * u.cm**2 * u.Hz)),
)
_C_AA_PER_S: float = const.c.to_value(u.AA / u.s)  # speed of light in Angstrom / s
_HC_ERG_AA: float = (const.h * const.c).to_value(u.erg * u.AA)  # photon energy * wavelength


# ----------------------------------------------------------------------------------------------------------- parse


def _astropy_spelling(text: str) -> str:
    """``text`` with the spectroscopists' spellings replaced by astropy's (see the module docstring)."""
    text = text.strip()
    return _WHOLE_ALIASES.get(text.lower()) or _ANGSTROM_WORD.sub("Angstrom", text)


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> u.UnitBase | None:
    """Aliases applied, parsed strictly; None when astropy does not know the string (multiple slashes are fine)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", u.UnitsWarning)
            return u.Unit(_astropy_spelling(text), parse_strict="raise")
    except (ValueError, TypeError):
        return None


def parse_unit(text: str, *, field: str) -> u.UnitBase:
    """The astropy unit ``text`` names, aliases included; ``UnitError`` naming ``field`` when there is none."""
    parsed = _parse(text)
    if parsed is None:
        raise UnitError(f"{text!r} is not a unit astropy knows, even read as a spectroscopist writes it", field=field)
    return parsed


# ------------------------------------------------------------------------------------------------------ wavelength


@functools.lru_cache(maxsize=256)
def _wavelength_converter(unit: str) -> Callable[[FloatArray], FloatArray]:
    """A function taking values in ``unit`` to Angstrom; cached because parsing costs more than the numpy work."""
    parsed = _parse(unit)
    if parsed is None:
        raise UnitError(f"unknown wavelength unit {unit!r}", field="wavelength_unit")
    if parsed.is_equivalent(u.AA):
        scale = parsed.to(u.AA)
        return lambda x: x * scale
    if parsed.is_equivalent(u.AA, equivalencies=u.spectral()):  # frequency, energy, wavenumber
        converter: Callable[[FloatArray], FloatArray] = parsed.get_converter(u.AA, equivalencies=u.spectral())
        return converter
    raise UnitError(f"{unit!r} is a {parsed.physical_type}, not a wavelength, frequency or energy",
                    field="wavelength_unit")


def to_angstrom(wavelength: FloatArray, unit: str) -> FloatArray:
    """Wavelengths (or frequencies/energies, through the spectral equivalency) in Angstrom, float64.

    Non-finite values pass through (``clean`` drops them); finite non-positive values raise, before conversion,
    because 0 Hz would otherwise become an infinite wavelength and vanish silently.
    """
    w = np.asarray(wavelength, dtype=np.float64)
    converter = _wavelength_converter(unit)
    with np.errstate(invalid="ignore"):
        if np.any(w <= 0):
            raise NonPositiveWavelengthError("wavelengths must be strictly positive", field="wavelength")
    return np.asarray(converter(w), dtype=np.float64)


# ------------------------------------------------------------------------------------------------------------ flux


@dataclass(frozen=True)
class FluxUnit:
    """What a flux unit string means: its kind, the factor to the kind's cgs reference, and its canonical name."""

    name: str  # astropy's spelling (FLAMBDA for F_lambda in erg/s/cm2/A, "" for a named arbitrary unit)
    kind: FluxKind
    scale: float  # multiply (physical) values by this to reach the kind's cgs reference unit
    magnitude: bool  # values are magnitudes of the physical unit: 10**(-0.4 m) first

    @property
    def calibrated(self) -> bool:
        """True for a physical flux density; arbitrary units say nothing about calibration."""
        return self.kind != "arbitrary"


def _classify(parsed: u.UnitBase) -> tuple[FluxKind, float, bool] | None:
    magnitude = isinstance(parsed, u.MagUnit)
    physical = parsed.physical_unit if magnitude else parsed
    if isinstance(physical, u.FunctionUnitBase) or (not magnitude and isinstance(parsed, u.FunctionUnitBase)):
        return None  # bare "mag", "dex": no zero point
    for kind, ref in _REFERENCES:
        if physical.is_equivalent(ref):
            return kind, float(physical.to(ref)), magnitude
    if physical.physical_type == "dimensionless" or set(physical.decompose().bases) <= _ARBITRARY_BASES:
        return "arbitrary", 1.0, magnitude
    return None


@functools.lru_cache(maxsize=256)
def flux_unit(unit: str) -> FluxUnit:
    """Read a flux unit: F_lambda, F_nu, photon flux, AB/ST magnitudes, or arbitrary; ``UnitError`` otherwise."""
    parsed = _parse(unit)
    classified = None if parsed is None else _classify(parsed)
    if unit.strip().lower() in _ARBITRARY_NAMES:
        named = parsed is not None and classified == ("arbitrary", 1.0, False)  # "count" -> "ct", "arb" -> ""
        return FluxUnit(str(parsed.to_string()) if parsed is not None and named else "", "arbitrary", 1.0, False)
    if parsed is None:
        raise UnitError(f"unknown flux unit {unit!r}", field="flux_unit")
    if classified is None:
        if isinstance(parsed, u.FunctionUnitBase):
            raise UnitError(f"{unit!r} is a magnitude without a zero point; use mag(AB) or mag(ST)",
                            field="flux_unit")
        raise UnitError(f"{unit!r} ({parsed.physical_type}) is not a flux density", field="flux_unit")
    name = FLAMBDA if parsed == _FLAM else str(parsed.to_string())
    return FluxUnit(name, *classified)


def _flambda_factor(unit: FluxUnit, wavelength_aa: FloatArray) -> FloatArray | float:
    """Per-pixel factor from the kind's reference unit to erg / (s cm2 Angstrom)."""
    if unit.kind == "fnu":  # F_lambda = F_nu c / lambda^2
        return unit.scale * _C_AA_PER_S / wavelength_aa**2
    if unit.kind == "photlam":  # one photon carries h c / lambda
        return unit.scale * _HC_ERG_AA / wavelength_aa
    if unit.kind == "photnu":
        return unit.scale * _HC_ERG_AA * _C_AA_PER_S / wavelength_aa**3
    return unit.scale


def to_flambda(flux: FloatArray, unit: str, wavelength_aa: FloatArray) -> FloatArray:
    """Flux in erg / (s cm2 Angstrom) from any F_lambda, F_nu, photon-flux or AB/ST-magnitude unit.

    Arbitrary units (empty, "dimensionless", "count", ...) are returned unchanged: only the shape matters downstream.
    """
    f = np.asarray(flux, dtype=np.float64)
    read = flux_unit(unit)
    if read.magnitude:
        f = 10.0 ** (-0.4 * f)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(f * _flambda_factor(read, np.asarray(wavelength_aa, dtype=np.float64)))


def flambda_err(flux_err: FloatArray, flux_flambda: FloatArray, unit: str, wavelength_aa: FloatArray) -> FloatArray:
    """Errors converted like ``to_flambda``: linearly, except magnitudes, where sigma_F = 0.4 ln(10) F sigma_m."""
    err = np.asarray(flux_err, dtype=np.float64)
    read = flux_unit(unit)
    if read.magnitude:
        return np.asarray(0.4 * math.log(10.0) * np.abs(flux_flambda) * err)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(err * _flambda_factor(read, np.asarray(wavelength_aa, dtype=np.float64)))
