"""Tests for ``spectranet.streamer.contract.readers``: every format against its source numbers, SNID cards ignored,
bad files rejected.

Expected values come from the source text files (parsed here with ``numpy.loadtxt``) and from
``tests/data/spectra/MANIFEST.csv``, never from the reader itself.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from spectranet.streamer.contract.readers import (
    CALIBRATED_FLUX_UNIT,
    FORMATS,
    SpectrumFile,
    read_spectrum,
    sniff_format,
)
from spectranet.streamer.errors import SpectrumFileError

DATA = Path(__file__).parent / "data"
SPECTRA = DATA / "spectra"
FORMATS_DIR = DATA / "formats"

SEDM_SOURCE = SPECTRA / "2019dwa_TNS_ZTF_SEDM_2019.0514.txt"
PYSEDM = FORMATS_DIR / "pysedm_ZTF19aatesgp.txt"
PLAIN_3COL = FORMATS_DIR / "plain_3col.txt"
PLAIN_2COL = FORMATS_DIR / "plain_2col.csv"
IMAGE = FORMATS_DIR / "image_1d.fits"
TABLE = FORMATS_DIR / "table_1d.fits"
# Sources named in tests/data/formats/make_fixtures.py.
PLAIN_3COL_SOURCE = SPECTRA / "PTF10bjp__01.txt"
PLAIN_2COL_SOURCE = SPECTRA / "SN2010ma__02.txt"
IMAGE_SOURCE = SPECTRA / "2022aawb_LT_SPRAT_SGLF_2022.1215.txt"
TABLE_SOURCE = SPECTRA / "SN2014ey__00.txt"


def source_columns(path: Path) -> np.ndarray:
    """The numbers of a shared-ascii file, read independently of the code under test."""
    return np.loadtxt(path, comments="#", ndmin=2)


def source_header(path: Path) -> dict[str, str]:
    """The ``# key: value`` cards of a shared-ascii file, read independently of the code under test."""
    cards = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            cards[key.strip()] = value.strip()
    return cards


def manifest_rows() -> list[dict[str, str]]:
    with (SPECTRA / "MANIFEST.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def optional_float(text: str) -> float | None:
    return float(text) if text.strip() else None


# ----------------------------------------------------------------------------------------------------------------
# shared-ascii: every fixture spectrum against its manifest row and its own numbers


@pytest.mark.parametrize("row", manifest_rows(), ids=lambda row: row["path"])
def test_shared_ascii_fixture_matches_manifest_and_numbers(row: dict[str, str]) -> None:
    path = SPECTRA / row["path"]
    spectrum = read_spectrum(path)
    expected = source_columns(path)

    assert spectrum.format == "shared-ascii"
    assert spectrum.path == str(path)
    np.testing.assert_array_equal(spectrum.wavelength, expected[:, 0])
    np.testing.assert_array_equal(spectrum.flux, expected[:, 1])
    if expected.shape[1] == 3:
        assert spectrum.flux_err is not None
        np.testing.assert_array_equal(spectrum.flux_err, expected[:, 2])
    else:
        assert spectrum.flux_err is None
    assert spectrum.wavelength.dtype == np.float64 and spectrum.flux.dtype == np.float64

    assert spectrum.object_id == row["object"]
    assert spectrum.label == row["type"]
    assert spectrum.redshift == optional_float(row["redshift"])
    assert spectrum.mjd == optional_float(row["mjd"])
    assert spectrum.frame == row["frame"]
    assert spectrum.instrument == (row["instrument"] or None)
    assert spectrum.telescope == (row["telescope"] or None)
    assert spectrum.flux_calibrated is (row["flux_kind"] == "calibrated")
    assert spectrum.flux_unit == (CALIBRATED_FLUX_UNIT if spectrum.flux_calibrated else "")
    assert spectrum.wavelength_unit == "Angstrom"
    assert spectrum.header == source_header(path)


def test_shared_ascii_keeps_every_header_card() -> None:
    spectrum = read_spectrum(TABLE_SOURCE)
    assert set(spectrum.header) == {
        "object", "type", "redshift", "frame", "flux_kind", "mjd", "phase_days",
        "instrument", "reference", "license", "columns",
    }
    assert spectrum.header["phase_days"] == source_header(TABLE_SOURCE)["phase_days"]


@pytest.mark.parametrize(
    ("card", "value", "attribute", "expected"),
    [
        ("flux_kind", "flattened", "flux_calibrated", False),
        ("flux_kind", "flattened", "flux_unit", ""),
        ("frame", "rest", "frame", "rest"),
        ("redshift", "", "redshift", None),
        ("type", "", "label", None),
        ("wavelength_unit", "nm", "wavelength_unit", "nm"),
        ("flux_unit", "mJy", "flux_unit", "mJy"),
    ],
)
def test_shared_ascii_card_values(tmp_path: Path, card: str, value: str, attribute: str, expected: object) -> None:
    path = with_card(tmp_path, TABLE_SOURCE, card, value)
    assert getattr(read_spectrum(path), attribute) == expected


@pytest.mark.parametrize(
    ("card", "value", "attribute", "expected"),
    [  # spellings that only preprocessing's alias table knew before streamer/science/units.py
        ("wavelength_unit", "nanometres", "wavelength_unit", "nm"),
        ("wavelength_unit", "microns", "wavelength_unit", "micron"),
        ("wavelength_unit", "ang", "wavelength_unit", "Angstrom"),
        ("flux_unit", "flam", "flux_unit", CALIBRATED_FLUX_UNIT),
        ("flux_unit", "flam", "flux_calibrated", True),
        ("flux_unit", "counts", "flux_calibrated", False),
        ("flux_unit", "ABmag", "flux_unit", "mag(AB)"),
        # and one the readers knew already, inside a compound unit
        ("flux_unit", "1e-17 erg/s/cm2/Ang", "flux_unit", "1e-17 erg / (Angstrom s cm2)"),
    ],
)
def test_shared_ascii_reads_every_unit_alias(tmp_path: Path, card: str, value: str, attribute: str,
                                             expected: object) -> None:
    path = with_card(tmp_path, TABLE_SOURCE, card, value)
    assert getattr(read_spectrum(path), attribute) == expected


def with_card(tmp_path: Path, source: Path, card: str, value: str) -> Path:
    """Copy ``source`` with ``card`` replaced (or added before the data) to ``tmp_path``."""
    lines = source.read_text().splitlines()
    replaced = [f"# {card}: {value}" if line.startswith(f"# {card}:") else line for line in lines]
    if replaced == lines:
        replaced.insert(0, f"# {card}: {value}")
    path = tmp_path / source.name
    path.write_text("\n".join(replaced) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# pysedm-ascii


def test_pysedm_matches_source_and_converts_variance() -> None:
    spectrum = read_spectrum(PYSEDM)
    expected = source_columns(SEDM_SOURCE)  # its third column is pysedm's variance (see make_fixtures.py)
    assert spectrum.format == "pysedm-ascii"
    np.testing.assert_array_equal(spectrum.wavelength, expected[:, 0])
    np.testing.assert_array_equal(spectrum.flux, expected[:, 1])
    assert spectrum.flux_err is not None
    np.testing.assert_allclose(spectrum.flux_err, np.sqrt(expected[:, 2]), rtol=1e-15)
    assert spectrum.object_id == "ZTF19aatesgp"
    assert spectrum.telescope == "P60"
    assert spectrum.instrument == "SEDM-P60"
    assert spectrum.mjd == float(source_header(SEDM_SOURCE)["mjd"])
    assert spectrum.flux_calibrated is True
    assert spectrum.flux_unit == CALIBRATED_FLUX_UNIT
    assert spectrum.frame == "observed"


def test_pysedm_snid_cards_are_never_label_or_redshift() -> None:
    spectrum = read_spectrum(PYSEDM)
    assert spectrum.header["SNIDMATCHTYPE"] == "II"  # the wrong guess is in the file ...
    assert spectrum.header["SNIDMATCHREDSHIFT"] == "0.0183"
    assert spectrum.label is None  # ... and is not reported as the classification
    assert spectrum.redshift is None


def test_pysedm_reported_classification_and_redshift_are_used(tmp_path: Path) -> None:
    path = tmp_path / "reported.txt"
    path.write_text("# CLASSIFICATION: SLSN-I\n# REDSHIFT: 0.082\n" + PYSEDM.read_text())
    spectrum = read_spectrum(path)
    assert (spectrum.label, spectrum.redshift) == ("SLSN-I", 0.082)


def test_pysedm_only_snid_cards_still_detected(tmp_path: Path) -> None:
    path = tmp_path / "snid_only.txt"
    path.write_text("# SNIDTYPE: Ia\n# SNIDZ: 0.05\n4000 1.0 0.01\n4001 2.0 0.04\n")
    spectrum = read_spectrum(path)
    assert spectrum.format == "pysedm-ascii"
    assert (spectrum.label, spectrum.redshift) == (None, None) and spectrum.flux_err is not None
    np.testing.assert_allclose(spectrum.flux_err, [0.1, 0.2])


# ----------------------------------------------------------------------------------------------------------------
# plain-ascii


@pytest.mark.parametrize(("fixture", "source"), [(PLAIN_3COL, PLAIN_3COL_SOURCE), (PLAIN_2COL, PLAIN_2COL_SOURCE)])
def test_plain_ascii_matches_source(fixture: Path, source: Path) -> None:
    spectrum = read_spectrum(fixture)
    expected = source_columns(source)
    assert spectrum.format == "plain-ascii"
    np.testing.assert_array_equal(spectrum.wavelength, expected[:, 0])
    np.testing.assert_array_equal(spectrum.flux, expected[:, 1])
    if expected.shape[1] == 3:
        np.testing.assert_array_equal(spectrum.flux_err, expected[:, 2])
    else:
        assert spectrum.flux_err is None
    assert (spectrum.object_id, spectrum.label, spectrum.redshift, spectrum.mjd) == (None, None, None, None)
    assert spectrum.flux_calibrated is False and spectrum.flux_unit == ""


def test_plain_ascii_accepts_comment_with_colon(tmp_path: Path) -> None:
    path = tmp_path / "note.txt"
    path.write_text("# note: reduced by hand\n5000, 1.5\n5001, 2.5\n")
    spectrum = read_spectrum(path)
    assert spectrum.format == "plain-ascii"
    np.testing.assert_array_equal(spectrum.flux, [1.5, 2.5])
    assert spectrum.header == {}


# ----------------------------------------------------------------------------------------------------------------
# FITS


def test_fits_image_matches_source() -> None:
    spectrum = read_spectrum(IMAGE)
    expected = source_columns(IMAGE_SOURCE)
    cards = source_header(IMAGE_SOURCE)
    assert spectrum.format == "fits"
    np.testing.assert_allclose(spectrum.wavelength, expected[:, 0], rtol=1e-12)
    np.testing.assert_array_equal(spectrum.flux, expected[:, 1])
    assert spectrum.flux_err is None
    assert spectrum.flux_calibrated is True
    assert spectrum.flux_unit == CALIBRATED_FLUX_UNIT  # written as "erg/s/cm2/A": "A" read as Angstrom
    assert spectrum.wavelength_unit == "Angstrom"
    assert spectrum.object_id == cards["object"]
    assert spectrum.label == cards["type"]
    assert spectrum.redshift == float(cards["redshift"])
    assert spectrum.mjd == float(cards["mjd"])
    assert spectrum.instrument == cards["instrument"]


@pytest.mark.parametrize("fixture", [IMAGE, TABLE])
def test_fits_snid_card_ignored(fixture: Path) -> None:
    spectrum = read_spectrum(fixture)
    assert spectrum.header["SNIDTYPE"] == "II"
    assert spectrum.label != "II" and spectrum.label is not None


def test_fits_table_matches_source_and_converts_ivar() -> None:
    spectrum = read_spectrum(TABLE)
    expected = source_columns(TABLE_SOURCE)
    cards = source_header(TABLE_SOURCE)
    np.testing.assert_array_equal(spectrum.wavelength, expected[:, 0])
    np.testing.assert_array_equal(spectrum.flux, expected[:, 1])
    assert spectrum.flux_err is not None
    np.testing.assert_allclose(spectrum.flux_err, expected[:, 2], rtol=1e-12)
    assert (spectrum.object_id, spectrum.label) == (cards["object"], cards["type"])
    assert spectrum.redshift == float(cards["redshift"])
    assert spectrum.flux_calibrated is True and spectrum.flux_unit == CALIBRATED_FLUX_UNIT


def write_table(path: Path, columns: list[fits.Column], **cards: object) -> Path:
    primary = fits.PrimaryHDU()
    primary.header.update(cards)
    fits.HDUList([primary, fits.BinTableHDU.from_columns(columns)]).writeto(path)
    return path


def test_fits_table_loglam_lowercase_and_error(tmp_path: Path) -> None:
    expected = source_columns(TABLE_SOURCE)
    path = write_table(tmp_path / "sdss.fits", [
        fits.Column(name="loglam", format="D", array=np.log10(expected[:, 0])),
        fits.Column(name="flux", format="E", array=expected[:, 1]),
        fits.Column(name="Flux_Err", format="D", array=expected[:, 2]),
    ])
    spectrum = read_spectrum(path)
    np.testing.assert_allclose(spectrum.wavelength, expected[:, 0], rtol=1e-12)
    np.testing.assert_allclose(spectrum.flux, expected[:, 1], rtol=1e-6)  # stored as float32
    np.testing.assert_array_equal(spectrum.flux_err, expected[:, 2])
    assert spectrum.flux_calibrated is False and spectrum.flux_unit == ""  # no unit anywhere: claim nothing


def test_fits_table_single_row_of_arrays(tmp_path: Path) -> None:
    expected = source_columns(PLAIN_3COL_SOURCE)
    n = len(expected)
    path = write_table(tmp_path / "vector.fits", [
        fits.Column(name="WAVELENGTH", format=f"{n}D", unit="nm", array=expected[None, :, 0] / 10),
        fits.Column(name="FLUX", format=f"{n}D", array=expected[None, :, 1]),
        fits.Column(name="VARIANCE", format=f"{n}D", array=expected[None, :, 2] ** 2),
    ])
    spectrum = read_spectrum(path)
    assert spectrum.wavelength_unit == "nm"
    np.testing.assert_allclose(spectrum.wavelength, expected[:, 0] / 10)
    assert spectrum.flux_err is not None
    np.testing.assert_allclose(spectrum.flux_err, expected[:, 2], rtol=1e-12)


def test_fits_image_cd_crpix_and_error_extension(tmp_path: Path) -> None:
    expected = source_columns(IMAGE_SOURCE)
    step = (expected[-1, 0] - expected[0, 0]) / (len(expected) - 1)
    primary = fits.PrimaryHDU(expected[:, 1])
    primary.header.update({"CRPIX1": 11.0, "CRVAL1": expected[10, 0], "CD1_1": step, "FLUXCAL": True})
    errors = fits.ImageHDU(np.full(len(expected), 4.0), name="IVAR")
    path = tmp_path / "cd.fits"
    fits.HDUList([primary, errors]).writeto(path)
    spectrum = read_spectrum(path)
    np.testing.assert_allclose(spectrum.wavelength, expected[:, 0], rtol=1e-12)
    np.testing.assert_array_equal(spectrum.flux_err, np.full(len(expected), 0.5))
    assert spectrum.flux_calibrated is True


def test_fits_image_log_linear_and_gzip(tmp_path: Path) -> None:
    primary = fits.PrimaryHDU(np.arange(5.0))
    primary.header.update({"CRVAL1": 3.6, "CDELT1": 0.001, "CRPIX1": 1.0, "DC-FLAG": 1, "BUNIT": "adu"})
    raw = tmp_path / "loglin.fits"
    primary.writeto(raw)
    packed = tmp_path / "loglin.fits.gz"
    packed.write_bytes(gzip.compress(raw.read_bytes()))
    spectrum = read_spectrum(packed)
    np.testing.assert_allclose(spectrum.wavelength, 10 ** (3.6 + 0.001 * np.arange(5)), rtol=1e-12)
    assert spectrum.flux_calibrated is False and spectrum.flux_unit == "adu"


# ----------------------------------------------------------------------------------------------------------------
# Sniffing and the result type


@pytest.mark.parametrize(
    ("path", "expected"),
    [(TABLE_SOURCE, "shared-ascii"), (PYSEDM, "pysedm-ascii"), (PLAIN_3COL, "plain-ascii"),
     (PLAIN_2COL, "plain-ascii"), (IMAGE, "fits"), (TABLE, "fits")],
)
def test_sniff_format(path: Path, expected: str) -> None:
    assert sniff_format(path) == expected
    assert sniff_format(str(path)) in FORMATS


def test_result_is_immutable() -> None:
    spectrum = read_spectrum(TABLE_SOURCE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spectrum.label = "II"  # type: ignore[misc]
    with pytest.raises(ValueError):
        spectrum.flux[0] = 0.0
    assert isinstance(spectrum, SpectrumFile)


# ----------------------------------------------------------------------------------------------------------------
# Bad files


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


SHARED_HEAD = "# object: SN2099x\n# type: Ia\n# flux_kind: calibrated\n# columns: wavelength flux\n"


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.txt", "", "empty"),
        ("blank.txt", "  \n\n", "empty"),
        ("only_header.txt", SHARED_HEAD, "no data rows"),
        ("non_numeric.txt", "4000 1.0\n4001 abc\n", "line 2: non-numeric value 'abc'"),
        ("non_numeric_shared.txt", SHARED_HEAD + "4000 1.0\n4001 1.o\n", "line 6: non-numeric value '1.o'"),
        ("ragged.txt", "4000 1.0 0.1\n4001 1.0\n", "line 2: expected 3 columns, found 2"),
        ("ragged_shared.txt", SHARED_HEAD + "4000 1.0\n4001 1.0 0.1\n", "line 6: expected 2 columns, found 3"),
        ("four_columns.txt", "4000 1 2 3\n", "line 1: expected 2 or 3 columns, found 4"),
        ("one_column.csv", "4000\n4001\n", "line 1: expected 2 or 3 columns, found 1"),
        ("bad_redshift.txt", "# redshift: about 0.1\n" + SHARED_HEAD + "4000 1\n", "field 'redshift'"),
        ("bad_kind.txt", SHARED_HEAD.replace("calibrated", "magic") + "4000 1\n", "field 'flux_kind'"),
        ("bad_columns.txt", SHARED_HEAD.replace("flux\n", "flux ivar\n") + "4000 1 2\n", "field 'columns'"),
        ("bad_frame.txt", "# frame: galactic\n" + SHARED_HEAD + "4000 1\n", "field 'frame'"),
        ("bad_unit.txt", "# flux_unit: bananas\n" + SHARED_HEAD + "4000 1\n", "field 'flux_unit'"),
        ("length_unit.txt", "# wavelength_unit: erg\n" + SHARED_HEAD + "4000 1\n", "field 'wavelength_unit'"),
        ("duplicate.txt", "# type: II\n" + SHARED_HEAD + "4000 1\n", "line 3: field 'type': header card appears twice"),
        ("neg_variance.txt", "# OBJECT: ZTF1\n4000 1 -1\n", "negative variance"),
        ("prose.txt", "this is not a spectrum\n", "line 1: expected 2 or 3 columns, found 5"),
        ("names_only.csv", "wavelength,flux\n", "no data rows"),
        ("names_then_text.csv", "wavelength,flux\n4000,1\nmore,text\n", "line 3: non-numeric value 'more'"),
        ("garbage.bin", bytes(range(256)) * 4, "not a spectrum file"),
        ("latin1.txt", "4000 1.0 # \xe9\n".encode("latin-1"), "not UTF-8"),
        ("truncated.fits", b"SIMPLE  =                    T" + b" " * 50 + b"garbage", "unreadable FITS"),
    ],
)
def test_bad_file_raises_naming_file(tmp_path: Path, name: str, content: str | bytes, fragment: str) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(SpectrumFileError) as info:
        read_spectrum(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert fragment in message, message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(SpectrumFileError, match="no such file") as info:
        read_spectrum(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(SpectrumFileError, match="directory"):
        read_spectrum(tmp_path)
    with pytest.raises(SpectrumFileError, match="no such file"):
        sniff_format(missing)


def write_hdus(hdus: list[fits.PrimaryHDU | fits.BinTableHDU], tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    fits.HDUList(hdus).writeto(path)
    return path


def test_bad_fits_contents(tmp_path: Path) -> None:
    cases = {
        "image_2d.fits": ([fits.PrimaryHDU(np.ones((3, 4)))], "2-D image"),
        "no_wcs.fits": ([fits.PrimaryHDU(np.ones(4))], "CRVAL1"),
        "no_step.fits": ([fits.PrimaryHDU(np.ones(4), header=fits.Header({"CRVAL1": 4000.0}))], "CDELT1"),
        "bad_ctype.fits": (
            [fits.PrimaryHDU(np.ones(4), header=fits.Header({"CRVAL1": 1.0, "CDELT1": 1.0, "CTYPE1": "RA---TAN"}))],
            "CTYPE1",
        ),
        "no_data.fits": ([fits.PrimaryHDU()], "no HDU holds"),
        "no_flux.fits": (
            [fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column(name="WAVE", format="D", array=[1.0])])],
            "lack a wavelength or flux column",
        ),
    }
    for name, (hdus, fragment) in cases.items():
        path = write_hdus(hdus, tmp_path, name)
        with pytest.raises(SpectrumFileError) as info:
            read_spectrum(path)
        assert str(info.value).startswith(str(path)) and fragment in str(info.value), (name, str(info.value))


# ----------------------------------------------------------------------------------------------------------------
# The end-to-end fixture set itself


def test_fixture_set_is_complete_and_credited() -> None:
    rows = manifest_rows()
    files = {p.name for p in SPECTRA.glob("*.txt")}
    assert len(rows) == 200 and {r["path"] for r in rows} == files
    assert SEDM_SOURCE.name in files
    assert len({r["type"] for r in rows}) >= 10
    size = sum((SPECTRA / name).stat().st_size for name in files)
    assert size < 4.5e6, size
    credits = (SPECTRA / "CREDITS.md").read_text()
    for source in {r["source"] for r in rows}:
        assert f"## {source} (" in credits
