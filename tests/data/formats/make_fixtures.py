"""Regenerate the format fixtures in this folder from real spectra in ``tests/data/spectra``.

Why a script: each fixture is a faithful re-encoding of one real spectrum, so the reader tests can compare what they
read against the source file's numbers. Data values are copied (text tokens verbatim, FITS as float64); header cards
that the source does not provide (exposure time, airmass, SNID results, pysedm version) are plausible placeholders.

Note on the SEDM source: its third column, labelled ``flux_err`` in the shared file, is really pysedm's variance
(values ~1e-31 against fluxes ~1e-15), so the pysedm fixture writes it unchanged as the variance column.

Usage::

    python tests/data/formats/make_fixtures.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

HERE = Path(__file__).resolve().parent
SPECTRA = HERE.parent / "spectra"

PYSEDM_SOURCE = "2019dwa_TNS_ZTF_SEDM_2019.0514.txt"
PLAIN_3COL_SOURCE = "PTF10bjp__01.txt"
PLAIN_2COL_SOURCE = "SN2010ma__02.txt"
IMAGE_SOURCE = "2022aawb_LT_SPRAT_SGLF_2022.1215.txt"
TABLE_SOURCE = "SN2014ey__00.txt"


def read_source(name: str) -> tuple[dict[str, str], list[list[str]]]:
    """Header cards and the data rows as the original text tokens (so copies are exact)."""
    header: dict[str, str] = {}
    rows: list[list[str]] = []
    for line in (SPECTRA / name).read_text().splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            header[key.strip()] = value.strip()
        elif line.strip():
            rows.append(line.split())
    return header, rows


def write_pysedm() -> None:
    """pysedm ascii: upper-case FITS cards as comments, then wavelength flux variance; SNID cards deliberately wrong."""
    header, rows = read_source(PYSEDM_SOURCE)
    mjd = float(header["mjd"])
    cards = {
        "SIMPLE": "True",
        "BITPIX": "-64",
        "NAXIS": "1",
        "NAXIS1": str(len(rows)),
        "EXTEND": "True",
        "OBJECT": "ZTF19aatesgp",
        "NAME": "ZTF19aatesgp",
        "TELESCOP": "P60",
        "INSTRUME": "SEDM-P60",
        "MJD_OBS": f"{mjd:.5f}",
        "JD": f"{mjd + 2400000.5:.5f}",
        "EXPTIME": "1800.0",
        "AIRMASS": "1.21",
        "FLUXCAL": "True",
        "QUALITY": "0",
        "PYSEDMV": "0.27.1",
        "SNIDMATCHTYPE": "II",
        "SNIDMATCHSUBTYPE": "IIP",
        "SNIDMATCHRLAP": "6.7",
        "SNIDMATCHREDSHIFT": "0.0183",
        "SNIDMATCHAGE": "21.4",
    }
    lines = [f"# {key}: {value}" for key, value in cards.items()]
    lines += [" ".join(row) for row in rows]
    (HERE / f"pysedm_{cards['OBJECT']}.txt").write_text("\n".join(lines) + "\n")


def write_plain() -> None:
    """No header cards: a comment line without a colon, then columns; the CSV has a column-name row."""
    _, rows = read_source(PLAIN_3COL_SOURCE)
    lines = [f"# wavelength flux flux_err, converted from {PLAIN_3COL_SOURCE}"] + ["  ".join(r) for r in rows]
    (HERE / "plain_3col.txt").write_text("\n".join(lines) + "\n")
    _, rows = read_source(PLAIN_2COL_SOURCE)
    lines = ["wavelength,flux"] + [",".join(r) for r in rows]
    (HERE / "plain_2col.csv").write_text("\n".join(lines) + "\n")


def metadata_cards(header: dict[str, str]) -> fits.Header:
    """FITS cards carrying the source metadata, plus a deliberately wrong SNID guess."""
    cards = fits.Header()
    cards["OBJECT"] = header["object"]
    cards["SNTYPE"] = (header["type"], "reported classification")
    cards["REDSHIFT"] = float(header["redshift"])
    cards["MJD-OBS"] = float(header["mjd"])
    cards["INSTRUME"] = header["instrument"]
    cards["SNIDTYPE"] = ("II", "automatic SNID guess (wrong on purpose)")
    return cards


def write_image() -> None:
    """1-D primary image with a linear WCS; the source grid is uniform, so CRVAL1/CDELT1 reproduce it."""
    header, rows = read_source(IMAGE_SOURCE)
    data = np.array(rows, dtype=np.float64)
    wavelength, flux = data[:, 0], data[:, 1]
    hdu = fits.PrimaryHDU(flux)
    hdu.header["CTYPE1"] = "WAVE"
    hdu.header["CUNIT1"] = "Angstrom"
    hdu.header["CRPIX1"] = 1.0
    hdu.header["CRVAL1"] = wavelength[0]
    hdu.header["CDELT1"] = (wavelength[-1] - wavelength[0]) / (wavelength.size - 1)
    hdu.header["BUNIT"] = "erg/s/cm2/A"  # the common spelling with "A" for Angstrom
    hdu.header.update(metadata_cards(header))
    hdu.writeto(HERE / "image_1d.fits", overwrite=True)


def write_table() -> None:
    """Binary table WAVE/FLUX/IVAR (SDSS-like inverse variance) with the metadata in the primary header."""
    header, rows = read_source(TABLE_SOURCE)
    data = np.array(rows, dtype=np.float64)
    columns = [
        fits.Column(name="WAVE", format="D", unit="Angstrom", array=data[:, 0]),
        fits.Column(name="FLUX", format="D", unit="erg / (s cm2 Angstrom)", array=data[:, 1]),
        fits.Column(name="IVAR", format="D", unit="(erg / (s cm2 Angstrom))-2", array=1.0 / data[:, 2] ** 2),
    ]
    primary = fits.PrimaryHDU(header=metadata_cards(header))
    table = fits.BinTableHDU.from_columns(columns, name="SPECTRUM")
    fits.HDUList([primary, table]).writeto(HERE / "table_1d.fits", overwrite=True)


def main() -> None:
    write_pysedm()
    write_plain()
    write_image()
    write_table()
    for path in sorted(HERE.iterdir()):
        print(f"{path.stat().st_size:8d}  {path.name}")


if __name__ == "__main__":
    main()
