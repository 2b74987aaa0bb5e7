"""Read one spectrum file from disk into a typed ``SpectrumFile``.

Four formats are recognised by content, never by file name:

- ``shared-ascii``: the project's own text format (``# key: value`` header in lower case, ``# columns:`` card, then
  ``wavelength flux [flux_err]`` rows);
- ``pysedm-ascii``: SEDM's pysedm output (``# KEY: value`` FITS-style cards in upper case, then
  ``wavelength flux variance`` rows);
- ``plain-ascii``: two or three whitespace- or comma-separated columns, optional ``#`` comments and one optional row
  of column names;
- ``fits``: a 1-D image with a linear (or log-linear) wavelength WCS, or a binary table with wavelength and flux
  columns.

The reader reports what the file says; it does not resample, mask or validate physics (that is preprocessing's job).
Any problem raises ``SpectrumFileError`` whose message starts with the file's path and names the line or field.
Automatic classifications stored in ``SNID*`` cards are never used as ``label`` or ``redshift``: they are guesses by
a template matcher, and training on them would teach the model SNID's mistakes.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
from astropy.io import fits
from astropy.time import Time
from spectranet.streamer.errors import SpectrumFileError, UnitError
from spectranet.streamer.science import units
from spectranet.streamer.science.preprocess import Prepared, PreprocessConfig, prepare

__all__ = ["flux_err_as_sigma", "prepare_file", "FORMATS", "SpectrumFile", "read_spectrum", "sniff_format"]

FORMATS = ("shared-ascii", "pysedm-ascii", "plain-ascii", "fits")

DEFAULT_WAVELENGTH_UNIT = "Angstrom"
CALIBRATED_FLUX_UNIT = units.FLAMBDA
UNCALIBRATED_FLUX_UNIT = ""

# shared-ascii ``flux_kind`` values; anything else is an error rather than a guess.
_CALIBRATED_KINDS = frozenset({"calibrated"})
_UNCALIBRATED_KINDS = frozenset(
    {"uncalibrated", "relative", "normalised", "normalized", "flattened", "continuum-divided", "continuum-subtracted"}
)
_SHARED_COLUMNS = (("wavelength", "flux"), ("wavelength", "flux", "flux_err"))
_FRAMES = frozenset({"observed", "rest"})

# Cards whose presence marks a pysedm / SEDM ascii header.
_PYSEDM_CARDS = frozenset({"OBJECT", "NAME", "INSTRUME", "TELESCOP", "TELESCOPE", "MJD_OBS", "MJD-OBS", "JD",
                           "EXPTIME", "AIRMASS", "PYSEDMV", "SOURCE", "QUALITY"})
# Cards that carry a reported classification in pysedm and FITS headers (a bare TYPE is too often an image type).
_LABEL_CARDS = ("CLASSIFICATION", "SNTYPE", "SN_TYPE")
_AUTOMATIC_PREFIX = "SNID"
_COMMENTARY_CARDS = frozenset({"COMMENT", "HISTORY", ""})

# FITS table column names, upper case, in order of preference.
_WAVE_COLUMNS = ("WAVELENGTH", "WAVE", "LAMBDA", "LAM", "WL")
_LOGWAVE_COLUMNS = ("LOGLAM",)
_FLUX_COLUMNS = ("FLUX", "FLAM", "F_LAMBDA", "SPEC", "DATA")
_ERR_COLUMNS = ("FLUX_ERR", "FLUX_ERROR", "ERR", "ERROR", "SIGMA", "UNCERTAINTY", "STDDEV", "E_FLUX", "NOISE")
_IVAR_COLUMNS = ("IVAR", "INVVAR", "FLUX_IVAR")
_VAR_COLUMNS = ("VAR", "VARIANCE", "FLUX_VAR")
_LINEAR_CTYPES = frozenset({"", "LINEAR", "WAVE", "AWAV", "WAVELENGTH", "LAMBDA", "PIXEL"})

_HEADER_CARD = re.compile(r"^#\s*([A-Za-z][A-Za-z0-9_.\-]*)\s*:\s?(.*?)\s*$")
_FITS_MAGIC = b"SIMPLE  ="
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, eq=False)  # eq=False: element-wise ndarray comparison has no single truth value
class SpectrumFile:
    """One spectrum as a file states it; arrays are float64 and read-only so the frozen promise holds."""

    path: str
    format: str
    wavelength: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray | None
    wavelength_unit: str
    flux_unit: str
    object_id: str | None
    label: str | None
    redshift: float | None
    frame: str
    flux_calibrated: bool
    mjd: float | None
    instrument: str | None
    telescope: str | None
    header: dict[str, str]


# ----------------------------------------------------------------------------------------------------------------
# Public entry points


def sniff_format(path: str | os.PathLike[str]) -> str:
    """Name the format of ``path`` from its content; raise ``SpectrumFileError`` if it is none of ``FORMATS``."""
    name = os.fspath(path)
    raw = _read_bytes(name)
    if _is_fits(raw):
        return "fits"
    return _sniff_text(_decode(raw, path=name), path=name)


def read_spectrum(path: str | os.PathLike[str]) -> SpectrumFile:
    """Read ``path`` in whichever supported format it is; raise ``SpectrumFileError`` naming the file on any problem."""
    name = os.fspath(path)
    raw = _read_bytes(name)
    if _is_fits(raw):
        return _read_fits(name)
    text = _decode(raw, path=name)
    readers: dict[str, Callable[[str, str], SpectrumFile]] = {
        "shared-ascii": _read_shared_ascii,
        "pysedm-ascii": _read_pysedm_ascii,
        "plain-ascii": _read_plain_ascii,
    }
    return readers[_sniff_text(text, path=name)](text, name)


# ----------------------------------------------------------------------------------------------------------------
# Bytes and sniffing


def _fail(path: str, message: str, *, line: int | None = None, field: str | None = None) -> SpectrumFileError:
    """Build the one error type with a uniform 'path[:line N][: field F]: message' text."""
    where = path
    if line is not None:
        where += f": line {line}"
    if field is not None:
        where += f": field {field!r}"
    return SpectrumFileError(f"{where}: {message}")


def _read_bytes(path: str) -> bytes:
    """Read the whole file; spectra are small, and one read keeps sniffing and parsing consistent."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise _fail(path, "no such file") from exc
    except IsADirectoryError as exc:
        raise _fail(path, "is a directory, not a spectrum file") from exc
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or exc}") from exc
    if not raw.strip():
        raise _fail(path, "file is empty")
    return raw


def _is_fits(raw: bytes) -> bool:
    """FITS files start with the SIMPLE card; gzip-compressed ones do after decompression."""
    if raw.startswith(_FITS_MAGIC):
        return True
    if raw.startswith(_GZIP_MAGIC):
        try:
            return gzip.decompress(raw).startswith(_FITS_MAGIC)
        except (OSError, EOFError):
            return False
    return False


def _decode(raw: bytes, *, path: str) -> str:
    """Text formats must be UTF-8 without NUL bytes; anything else is binary we do not understand."""
    if b"\x00" in raw:
        raise _fail(path, "binary content (NUL bytes) and not FITS: not a spectrum file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _fail(path, f"not UTF-8 text and not FITS (byte {exc.start}): not a spectrum file") from exc


def _header_cards(text: str) -> list[tuple[int, str, str]]:
    """Return (line number, key, value) for every ``# key: value`` comment line, in file order."""
    cards = []
    for number, line in enumerate(text.splitlines(), start=1):
        match = _HEADER_CARD.match(line.strip()) if line.lstrip().startswith("#") else None
        if match:
            cards.append((number, match.group(1), match.group(2)))
    return cards


def _sniff_text(text: str, *, path: str) -> str:
    """Lower-case ``columns``/``object`` cards mean shared-ascii, upper-case SEDM cards pysedm, else plain."""
    keys = {key for _, key, _ in _header_cards(text)}
    if keys & {"columns", "object", "flux_kind"}:
        return "shared-ascii"
    upper = {key for key in keys if key == key.upper()}
    if upper & _PYSEDM_CARDS or any(key.startswith(_AUTOMATIC_PREFIX) for key in upper):
        return "pysedm-ascii"
    if not any(_data_lines(text)):
        raise _fail(path, "no data rows and no recognised header: not a spectrum file")
    return "plain-ascii"


# ----------------------------------------------------------------------------------------------------------------
# Text tables


def _data_lines(text: str) -> list[tuple[int, str]]:
    """Non-blank, non-comment lines with their 1-based line numbers."""
    return [
        (number, stripped)
        for number, line in enumerate(text.splitlines(), start=1)
        if (stripped := line.strip()) and not stripped.startswith("#")
    ]


def _tokens(line: str) -> list[str]:
    """Split a data row on whitespace and/or commas."""
    return line.replace(",", " ").split()


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _parse_rows(lines: Sequence[tuple[int, str]], *, path: str, ncols: int | None) -> np.ndarray:
    """Parse numeric rows into an (nrows, ncols) float64 array; without ``ncols`` the first row sets it (2 or 3)."""
    if not lines:
        raise _fail(path, "no data rows")
    rows = [_tokens(line) for _, line in lines]
    expected = ncols if ncols is not None else len(rows[0])
    if ncols is None and expected not in (2, 3):
        raise _fail(path, f"expected 2 or 3 columns, found {expected}", line=lines[0][0])
    for (number, _), tokens in zip(lines, rows):
        if len(tokens) != expected:
            raise _fail(path, f"expected {expected} columns, found {len(tokens)}", line=number)
    try:
        return np.array(rows, dtype=np.float64)
    except ValueError as exc:
        # Slow path only to name the offending line and token.
        number, bad = next((n, t) for (n, _), tokens in zip(lines, rows) for t in tokens if not _is_number(t))
        raise _fail(path, f"non-numeric value {bad!r}", line=number) from exc


def _frozen(array: np.ndarray) -> np.ndarray:
    """A contiguous float64 copy that cannot be written, so SpectrumFile stays immutable."""
    out = np.array(array, dtype=np.float64, copy=True, order="C")
    out.setflags(write=False)
    return out


class _Columns(TypedDict):
    wavelength: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray | None


def _columns(table: np.ndarray) -> _Columns:
    """``wavelength``, ``flux`` and ``flux_err`` (None without a third column) of a parsed text table, frozen."""
    return {"wavelength": _frozen(table[:, 0]), "flux": _frozen(table[:, 1]),
            "flux_err": _frozen(table[:, 2]) if table.shape[1] == 3 else None}


def _card_dict(cards: list[tuple[int, str, str]], *, path: str) -> dict[str, str]:
    """Cards as a dict; a repeated key is an error unless it is commentary (joined with newlines)."""
    header: dict[str, str] = {}
    for number, key, value in cards:
        if key in header:
            if key.upper() in _COMMENTARY_CARDS:
                header[key] += "\n" + value
                continue
            raise _fail(path, "header card appears twice", line=number, field=key)
        header[key] = value
    return header


def _optional_text(value: str | None) -> str | None:
    """Blank header values mean 'not given'."""
    if value is None:
        return None
    value = value.strip().strip("'\"").strip()
    return value or None


def _optional_float(header: Mapping[str, str], key: str, *, path: str) -> float | None:
    """A finite float from a header card, None when absent or blank, an error when unparseable."""
    text = _optional_text(header.get(key))
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError as exc:
        raise _fail(path, f"not a number: {text!r}", field=key) from exc
    if not math.isfinite(value):
        raise _fail(path, f"not a finite number: {text!r}", field=key)
    return value


def _first_present(header: Mapping[str, str], keys: Sequence[str]) -> str | None:
    """The first of ``keys`` present in ``header`` (so callers can name the card they used)."""
    return next((key for key in keys if key in header), None)


def _card_text(header: Mapping[str, str], *keys: str) -> str | None:
    """The first non-blank value among ``keys`` (synonymous cards, e.g. TELESCOP/TELESCOPE)."""
    return next((text for key in keys if (text := _optional_text(header.get(key))) is not None), None)


# ----------------------------------------------------------------------------------------------------------------
# Units


def _wavelength_unit(text: str | None, *, path: str, field: str) -> str:
    """A file's wavelength column is a length (``units`` reads the spelling); None means the Angstrom default."""
    if _optional_text(text) is None:
        return DEFAULT_WAVELENGTH_UNIT
    try:
        unit = units.parse_unit(str(text), field=field)
    except UnitError as exc:
        raise _fail(path, f"unit {text!r} is not an astropy unit", field=field) from exc
    if unit.physical_type != "length":
        raise _fail(path, f"unit {text!r} is not a length", field=field)
    return str(unit.to_string())


def _flux_unit(text: str | None, calibrated: bool, *, path: str, field: str) -> tuple[str, bool]:
    """(unit, calibrated?) from a flux unit card; without one, what the calibration card says. A physical flux
    density is calibrated, an arbitrary unit (counts, ADU, dimensionless, ...) is not, anything else is an error."""
    if text is None:
        return (CALIBRATED_FLUX_UNIT if calibrated else UNCALIBRATED_FLUX_UNIT), calibrated
    try:
        unit = units.flux_unit(text)
    except UnitError as exc:
        raise _fail(path, f"unit {text!r} is not a flux density, count or dimensionless ({exc.reason})",
                    field=field) from exc
    return unit.name, unit.calibrated


def _frame(header: Mapping[str, str], key: str, *, path: str) -> str:
    """'observed' (the default) or 'rest', from the card ``key``."""
    frame = (_optional_text(header.get(key)) or "observed").lower()
    if frame not in _FRAMES:
        raise _fail(path, f"frame must be 'observed' or 'rest', not {frame!r}", field=key)
    return frame


# ----------------------------------------------------------------------------------------------------------------
# shared-ascii


def _read_shared_ascii(text: str, path: str) -> SpectrumFile:
    """The project's own format: lower-case cards, declared columns, flux_kind states calibration."""
    cards = _header_cards(text)
    header = _card_dict(cards, path=path)
    lines = _data_lines(text)

    declared = _optional_text(header.get("columns"))
    if declared is None:
        table = _parse_rows(lines, path=path, ncols=None)
    else:
        names = tuple(declared.split())
        if names not in _SHARED_COLUMNS:
            allowed = " | ".join(" ".join(n) for n in _SHARED_COLUMNS)
            raise _fail(path, f"unsupported columns {declared!r} (expected {allowed})", field="columns")
        table = _parse_rows(lines, path=path, ncols=len(names))

    kind = (_optional_text(header.get("flux_kind")) or "uncalibrated").lower()
    if kind in _CALIBRATED_KINDS:
        calibrated = True
    elif kind in _UNCALIBRATED_KINDS:
        calibrated = False
    else:
        raise _fail(path, f"unknown flux_kind {kind!r}", field="flux_kind")
    flux_unit, calibrated = _flux_unit(header.get("flux_unit"), calibrated, path=path, field="flux_unit")

    return SpectrumFile(
        path=path,
        format="shared-ascii",
        **_columns(table),
        wavelength_unit=_wavelength_unit(header.get("wavelength_unit"), path=path, field="wavelength_unit"),
        flux_unit=flux_unit,
        object_id=_optional_text(header.get("object")),
        label=_optional_text(header.get("type")),
        redshift=_optional_float(header, "redshift", path=path),
        frame=_frame(header, "frame", path=path),
        flux_calibrated=calibrated,
        mjd=_optional_float(header, "mjd", path=path),
        instrument=_optional_text(header.get("instrument")),
        telescope=_optional_text(header.get("telescope")),
        header=header,
    )


# ----------------------------------------------------------------------------------------------------------------
# pysedm-ascii


def _truthy_card(value: str) -> bool:
    """FITS-style booleans as pysedm prints them (T/F, True/False, 1/0)."""
    return value.strip().strip("'\"").upper() in {"T", "TRUE", "1", "YES"}


def _mjd_from_cards(header: Mapping[str, str], *, path: str) -> float | None:
    """MJD from MJD_OBS/MJD-OBS/MJD, else JD - 2400000.5, else DATE-OBS (ISO)."""
    key = _first_present(header, ("MJD_OBS", "MJD-OBS", "MJD"))
    if key is not None:
        return _optional_float(header, key, path=path)
    jd = _optional_float(header, "JD", path=path)
    if jd is not None:
        return jd - 2400000.5
    date = _optional_text(header.get("DATE-OBS"))
    if date is None:
        return None
    try:
        return float(Time(date, format="isot", scale="utc").mjd)
    except ValueError as exc:
        raise _fail(path, f"not an ISO date: {date!r}", field="DATE-OBS") from exc


def _human_label(header: Mapping[str, str]) -> str | None:
    """A reported classification card; SNID* cards are automatic guesses and are not in ``_LABEL_CARDS``."""
    return _card_text(header, *_LABEL_CARDS)


def _read_pysedm_ascii(text: str, path: str) -> SpectrumFile:
    """pysedm writes FITS cards as comments and a variance column; convert variance to 1-sigma."""
    header = _card_dict(_header_cards(text), path=path)
    table = _parse_rows(_data_lines(text), path=path, ncols=None)
    flux_err = None
    if table.shape[1] == 3:
        variance = table[:, 2]
        if np.any(variance < 0):
            row = int(np.flatnonzero(variance < 0)[0])
            raise _fail(path, f"negative variance {variance[row]!r} in data row {row + 1}", field="variance")
        flux_err = np.sqrt(variance)

    calibrated = _truthy_card(header["FLUXCAL"]) if "FLUXCAL" in header else True
    unit_key = _first_present(header, ("BUNIT", "FLUXUNIT")) or "BUNIT"
    flux_unit, calibrated = _flux_unit(header.get(unit_key), calibrated, path=path, field=unit_key)

    return SpectrumFile(
        path=path,
        format="pysedm-ascii",
        wavelength=_frozen(table[:, 0]),
        flux=_frozen(table[:, 1]),
        flux_err=_frozen(flux_err) if flux_err is not None else None,
        wavelength_unit=_wavelength_unit(header.get("CUNIT1"), path=path, field="CUNIT1"),
        flux_unit=flux_unit,
        object_id=_card_text(header, "OBJECT", "NAME"),
        label=_human_label(header),
        redshift=_optional_float(header, "REDSHIFT", path=path),
        frame="observed",
        flux_calibrated=calibrated,
        mjd=_mjd_from_cards(header, path=path),
        instrument=_card_text(header, "INSTRUME", "INSTRUMENT"),
        telescope=_card_text(header, "TELESCOP", "TELESCOPE"),
        header=header,
    )


# ----------------------------------------------------------------------------------------------------------------
# plain-ascii


def _read_plain_ascii(text: str, path: str) -> SpectrumFile:
    """Columns only: nothing is known about the object or the calibration, so claim nothing."""
    lines = _data_lines(text)
    header: dict[str, str] = {}
    first = _tokens(lines[0][1]) if lines else []
    if len(first) in (2, 3) and not any(_is_number(t) for t in first):  # a CSV-style row of column names
        header["columns"] = " ".join(first)
        lines = lines[1:]
    table = _parse_rows(lines, path=path, ncols=None)
    return SpectrumFile(path=path, format="plain-ascii", **_columns(table), wavelength_unit=DEFAULT_WAVELENGTH_UNIT,
                        flux_unit=UNCALIBRATED_FLUX_UNIT, flux_calibrated=False, frame="observed", header=header,
                        object_id=None, label=None, redshift=None, mjd=None, instrument=None, telescope=None)


# ----------------------------------------------------------------------------------------------------------------
# FITS


@dataclass(frozen=True)
class _FitsArrays:
    """What one FITS HDU yields before metadata is attached."""

    wavelength: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray | None
    wavelength_unit: str
    flux_unit_text: str | None


def _fits_header_dict(*headers: fits.Header) -> dict[str, str]:
    """All cards of the given headers as strings; later headers win; commentary cards are joined."""
    out: dict[str, str] = {}
    for header in headers:
        for card in header.cards:
            key, value = card.keyword, card.value
            text = "" if value is None else str(value)
            if key in _COMMENTARY_CARDS:
                key = key or "COMMENT"
                out[key] = f"{out[key]}\n{text}" if key in out else text
            else:
                out[key] = text
    return out


def _error_from(kind: str, values: np.ndarray) -> np.ndarray:
    """Turn an error, inverse-variance or variance array into 1-sigma; ivar <= 0 means no information (inf)."""
    values = np.asarray(values, dtype=np.float64)
    if kind == "ivar":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(values > 0, 1.0 / np.sqrt(np.where(values > 0, values, 1.0)), np.inf)
    if kind == "var":
        with np.errstate(invalid="ignore"):
            sigma: np.ndarray = np.sqrt(values)
            return sigma
    return values


def _image_wavelength(header: fits.Header, n: int, *, path: str) -> np.ndarray:
    """Linear WCS (CRVAL1, CDELT1/CD1_1, CRPIX1), IRAF log-linear (DC-FLAG=1) or SDSS COEFF0/COEFF1."""
    if "COEFF0" in header and "COEFF1" in header and "CRVAL1" not in header:
        return 10.0 ** (float(header["COEFF0"]) + float(header["COEFF1"]) * np.arange(n))
    if "CRVAL1" not in header:
        raise _fail(path, "1-D image without a wavelength solution (CRVAL1 missing)", field="CRVAL1")
    step_key = _first_present(header, ("CDELT1", "CD1_1"))
    if step_key is None:
        raise _fail(path, "1-D image without a wavelength step (CDELT1 or CD1_1)", field="CDELT1")
    ctype = str(header.get("CTYPE1", "")).strip().upper()
    if ctype not in _LINEAR_CTYPES:
        raise _fail(path, f"unsupported wavelength axis type {ctype!r}", field="CTYPE1")
    try:
        crval, step, crpix = float(header["CRVAL1"]), float(header[step_key]), float(header.get("CRPIX1", 1.0))
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"non-numeric WCS card: {exc}", field="CRVAL1") from exc
    pixel = np.arange(1, n + 1, dtype=np.float64)
    wavelength = crval + (pixel - crpix) * step
    if int(header.get("DC-FLAG", 0)) == 1:
        wavelength = 10.0**wavelength
    return wavelength


def _image_errors(hdul: fits.HDUList, n: int) -> np.ndarray | None:
    """An ERR/IVAR/VAR image extension of the same length, if the file has one."""
    kinds = {**{name: "err" for name in _ERR_COLUMNS}, **{name: "ivar" for name in _IVAR_COLUMNS},
             **{name: "var" for name in _VAR_COLUMNS}}
    for hdu in hdul[1:]:
        name = str(hdu.header.get("EXTNAME", "")).strip().upper()
        if name in kinds and isinstance(hdu, fits.ImageHDU) and hdu.data is not None:
            data = np.squeeze(np.asarray(hdu.data))
            if data.shape == (n,):
                return _error_from(kinds[name], data)
    return None


def _from_image(hdul: fits.HDUList, index: int, *, path: str) -> _FitsArrays:
    """A 1-D image (degenerate axes allowed) whose wavelength comes from the WCS."""
    hdu = hdul[index]
    flux = np.squeeze(np.asarray(hdu.data, dtype=np.float64))
    if flux.ndim != 1:
        raise _fail(path, f"HDU {index} is a {flux.ndim}-D image, not a 1-D spectrum", field="NAXIS")
    header = hdu.header
    return _FitsArrays(
        wavelength=_image_wavelength(header, flux.size, path=path),
        flux=flux,
        flux_err=_image_errors(hdul, flux.size),
        wavelength_unit=_wavelength_unit(header.get("CUNIT1"), path=path, field="CUNIT1"),
        flux_unit_text=_optional_text(header.get("BUNIT")),
    )


def _table_column(names: Mapping[str, str], candidates: Sequence[str]) -> str | None:
    """The table's own spelling of the first candidate name present (case-insensitive)."""
    return next((names[c] for c in candidates if c in names), None)


def _column_values(data: fits.FITS_rec, name: str) -> np.ndarray:
    """Column as float64: one scalar per row, or a single row holding array cells (IUE/HST style)."""
    values = np.asarray(data[name], dtype=np.float64)
    return values[0] if values.ndim == 2 and values.shape[0] == 1 else values


def _from_table(hdu: fits.BinTableHDU, *, path: str) -> _FitsArrays:
    """A binary table with a wavelength (or log10 wavelength) column, a flux column and maybe an error column."""
    names = {name.upper(): name for name in hdu.columns.names}
    flux_name = _table_column(names, _FLUX_COLUMNS)
    wave_name = _table_column(names, _WAVE_COLUMNS)
    loglam_name = _table_column(names, _LOGWAVE_COLUMNS)
    if flux_name is None or (wave_name is None and loglam_name is None):
        raise _fail(path, f"table columns {hdu.columns.names} lack a wavelength or flux column", field="TTYPE")
    data = hdu.data
    flux = _column_values(data, flux_name)
    if wave_name is not None:
        wavelength = _column_values(data, wave_name)
        unit = _wavelength_unit(hdu.columns[wave_name].unit, path=path, field=f"TUNIT of {wave_name}")
    else:
        wavelength = 10.0 ** _column_values(data, str(loglam_name))
        unit = DEFAULT_WAVELENGTH_UNIT
    flux_err = None
    for kind, candidates in (("err", _ERR_COLUMNS), ("ivar", _IVAR_COLUMNS), ("var", _VAR_COLUMNS)):
        err_name = _table_column(names, candidates)
        if err_name is not None:
            flux_err = _error_from(kind, _column_values(data, err_name))
            break
    arrays = [wavelength, flux] + ([flux_err] if flux_err is not None else [])
    if len({a.shape for a in arrays}) != 1 or any(a.ndim != 1 for a in arrays):
        raise _fail(path, f"table columns have different shapes {[a.shape for a in arrays]}", field="TTYPE")
    return _FitsArrays(
        wavelength=wavelength,
        flux=flux,
        flux_err=flux_err,
        wavelength_unit=unit,
        flux_unit_text=_optional_text(hdu.columns[flux_name].unit) or _optional_text(hdu.header.get("BUNIT")),
    )


def _spectrum_hdu(hdul: fits.HDUList, *, path: str) -> int:
    """Index of the first HDU holding a spectrum: an image with data, else a binary table."""
    for index, hdu in enumerate(hdul):
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU)) and hdu.data is not None and hdu.data.size > 1:
            return index
        if isinstance(hdu, fits.BinTableHDU) and hdu.data is not None and len(hdu.data) > 0:
            return index
    raise _fail(path, "no HDU holds an image or a table with data")


def _read_fits(path: str) -> SpectrumFile:
    """Open with astropy, take the first spectrum-bearing HDU, attach metadata from primary + that HDU."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            with fits.open(path, memmap=False) as hdul:
                index = _spectrum_hdu(hdul, path=path)
                hdu = hdul[index]
                if isinstance(hdu, fits.BinTableHDU):
                    arrays = _from_table(hdu, path=path)
                else:
                    arrays = _from_image(hdul, index, path=path)
                header = _fits_header_dict(hdul[0].header, *([hdu.header] if index else []))
    except (OSError, ValueError, TypeError, fits.VerifyError) as exc:
        raise _fail(path, f"unreadable FITS file: {exc}") from exc

    calibrated = _truthy_card(header["FLUXCAL"]) if "FLUXCAL" in header else False
    flux_unit, calibrated = _flux_unit(arrays.flux_unit_text, calibrated, path=path, field="BUNIT")

    return SpectrumFile(
        path=path,
        format="fits",
        wavelength=_frozen(arrays.wavelength),
        flux=_frozen(arrays.flux),
        flux_err=_frozen(arrays.flux_err) if arrays.flux_err is not None else None,
        wavelength_unit=arrays.wavelength_unit,
        flux_unit=flux_unit,
        object_id=_card_text(header, "OBJECT"),
        label=_human_label(header),
        redshift=_optional_float(header, "REDSHIFT", path=path),
        frame=_frame(header, "FRAME", path=path),
        flux_calibrated=calibrated,
        mjd=_mjd_from_cards(header, path=path),
        instrument=_card_text(header, "INSTRUME"),
        telescope=_card_text(header, "TELESCOP"),
        header=header,
    )


_VARIANCE_RATIO = 1e-6


def flux_err_as_sigma(flux: np.ndarray, flux_err: np.ndarray) -> np.ndarray:
    """1-sigma errors from a column that may hold variances (some slsne and WISeREP files): square-rooted when its
    median is below 1e-6 of the median |flux|, which no real 1-sigma error is."""
    e = np.asarray(flux_err, dtype=np.float64)
    f = np.abs(np.asarray(flux, dtype=np.float64))
    ok = np.isfinite(e) & np.isfinite(f)
    if ok.any() and np.median(np.abs(e[ok])) < _VARIANCE_RATIO * np.median(f[ok]):
        return np.sqrt(np.abs(e))
    return e


def prepare_file(sf: SpectrumFile, config: PreprocessConfig) -> Prepared:
    """A spectrum file on the model grid: the one path from a file to the model's input (``spectranet classify``,
    evaluation). Error columns that hold variances are square-rooted; rest-frame files use their header redshift."""
    err = None if sf.flux_err is None else flux_err_as_sigma(sf.flux, sf.flux_err)
    return prepare(sf.wavelength, sf.flux, flux_err=err, wavelength_unit=sf.wavelength_unit,
                   flux_unit=sf.flux_unit, flux_calibrated=sf.flux_calibrated, frame=sf.frame,  # type: ignore[arg-type]
                   redshift=(sf.redshift or 0.0) if sf.frame == "rest" else None, config=config)
