"""Tests of spectranet.streamer.science.preprocess (and .units): each step alone, properties with hypothesis, and
prepare() end to end.

Expected values come from physics (c / lambda^2, Morton's refractive index, line lists), from astropy, or from
brute-force reference implementations written here, never from the module's own output.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy import units as u
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from spectranet.streamer.errors import (
    ConfigError,
    LengthMismatchError,
    NonPositiveWavelengthError,
    NoOverlapError,
    PreprocessError,
    TooFewPixelsError,
    UnitError,
)
from spectranet.streamer.science import preprocess as pp
from spectranet.streamer.science import units
from spectranet.streamer.science.preprocess import (
    Grid,
    PreprocessConfig,
    air_to_vacuum,
    clean,
    der_snr,
    median_snr,
    normalise_robust,
    prepare,
    rebin,
    remove_continuum,
    rest_frame,
    to_angstrom,
    to_flambda,
)

C_AA_PER_S = 2.99792458e18  # exact, by definition of the metre
SPECTRUM = Path("/work/shared/data/spectra/osc/SN2010jn__04.txt")
FAST = settings(max_examples=60, deadline=None)


def _reference_rebin(wave, flux, edges, err=None):
    """Brute-force SpectRes: pixel edges at midpoints (ends mirrored), overlap-weighted mean, loop over bins."""
    mids = (wave[1:] + wave[:-1]) / 2
    lo = np.concatenate(([wave[0] - (wave[1] - wave[0]) / 2], mids))
    hi = np.concatenate((mids, [wave[-1] + (wave[-1] - wave[-2]) / 2]))
    out_f, out_e, frac = [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        ov = np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0, None)
        cov = ov.sum()
        frac.append(cov / (b - a))
        out_f.append((ov * flux).sum() / cov if cov > 0 else 0.0)
        out_e.append(math.sqrt(((ov * err) ** 2).sum()) / cov if (cov > 0 and err is not None) else 0.0)
    return np.array(out_f), np.array(out_e), np.array(frac)


def _morton_vacuum_to_air(vac):
    """Morton (2000) / IAU vacuum-to-air, the direction the standard formula is written in."""
    s2 = (1e4 / vac) ** 2
    n = 1 + 8.34254e-5 + 2.406147e-2 / (130 - s2) + 1.5998e-4 / (38.9 - s2)
    return vac / n


def _read_osc(path):
    header = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") and ":" in line:
            key, value = line[1:].split(":", 1)
            header[key.strip()] = value.strip()
    data = np.loadtxt(path, comments="#")
    return header, data[:, 0], data[:, 1]


def _smooth_continuum(w):
    return (w / 5000.0) ** -1.5 * (1.0 + 0.2 * np.cos(2 * np.pi * (w - 3500.0) / 6500.0))


# ---------------------------------------------------------------------------------------------------------- config


def test_grid_edges_are_log_uniform_and_span_the_range():
    grid = Grid(3500.0, 10000.0, 1024)
    edges, centers = grid.edges(), grid.centers()
    assert edges.shape == (1025,) and centers.shape == (1024,)
    assert edges[0] == pytest.approx(3500.0) and edges[-1] == pytest.approx(10000.0)
    ratios = edges[1:] / edges[:-1]
    np.testing.assert_allclose(ratios, (10000.0 / 3500.0) ** (1 / 1024), rtol=1e-12)
    np.testing.assert_allclose(centers, np.sqrt(edges[1:] * edges[:-1]), rtol=1e-12)
    assert np.all((centers > edges[:-1]) & (centers < edges[1:]))
    with pytest.raises(ValueError):
        edges[0] = 1.0  # cached arrays are shared, so they must be read-only


@pytest.mark.parametrize("args", [(0.0, 10.0, 10), (10.0, 5.0, 10), (1.0, 2.0, 1), (1.0, 2.0, 2.5)])
def test_grid_rejects_invalid(args):
    with pytest.raises(ConfigError):
        Grid(*args)


def test_config_round_trips_through_json():
    cfg = PreprocessConfig(grid=Grid(4000.0, 9000.0, 512), normalisation="continuum", min_valid_pixels=30,
                           min_coverage=0.25, continuum_knots=9, to_rest_frame=True)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["version"] == pp.PREPROCESS_VERSION
    assert PreprocessConfig.from_dict(d) == cfg
    assert Grid.from_dict(cfg.grid.to_dict()) == cfg.grid
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()


@pytest.mark.parametrize("d", [{"nonsense": 1}, {"version": "0.1"}, {"normalisation": "minmax"},
                               {"min_coverage": 1.5}, {"continuum_knots": 1}, {"grid": {"wave_min": 1.0}}])
def test_config_from_dict_rejects_bad_input(d):
    with pytest.raises(ConfigError):
        PreprocessConfig.from_dict(d)


def test_version_is_supported_and_all_is_complete():
    assert pp.PREPROCESS_VERSION in pp.SUPPORTED_PREPROCESS_VERSIONS
    for name in pp.__all__:
        assert hasattr(pp, name), name


# ----------------------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("unit, factor", [("Angstrom", 1.0), ("AA", 1.0), ("angstroms", 1.0), ("A", 1.0),
                                          ("nm", 10.0), ("um", 1e4), ("micron", 1e4), ("m", 1e10), ("cm", 1e8)])
def test_to_angstrom_length_units(unit, factor):
    w = np.array([0.3, 1.0, 2.5])
    np.testing.assert_allclose(to_angstrom(w, unit), w * factor, rtol=1e-12)


def test_to_angstrom_frequency_and_energy():
    np.testing.assert_allclose(to_angstrom(np.array([3e14, 6e14]), "Hz"), C_AA_PER_S / np.array([3e14, 6e14]))
    np.testing.assert_allclose(to_angstrom(np.array([2.0]), "eV"), [12398.419843 / 2.0], rtol=1e-8)


@given(hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(100.0, 1e6)))
@FAST
def test_nm_angstrom_round_trip(w_aa):
    np.testing.assert_allclose(to_angstrom(w_aa / 10.0, "nm"), w_aa, rtol=1e-12)
    np.testing.assert_allclose(to_angstrom(C_AA_PER_S / w_aa, "Hz"), w_aa, rtol=1e-10)


@pytest.mark.parametrize("unit", ["parsecs of doom", "kg", "erg / s", "Jy"])
def test_to_angstrom_rejects_unknown_and_wrong_type(unit):
    with pytest.raises(UnitError) as info:
        to_angstrom(np.array([5000.0]), unit)
    assert info.value.field == "wavelength_unit"


def test_to_angstrom_rejects_non_positive():
    with pytest.raises(NonPositiveWavelengthError) as info:
        to_angstrom(np.array([5000.0, 0.0]), "Hz")
    assert info.value.field == "wavelength"


def test_to_flambda_flambda_units():
    w = np.array([4000.0, 6000.0])
    f = np.array([1.0, 2.0])
    np.testing.assert_allclose(to_flambda(f, "erg / (s cm2 Angstrom)", w), f)
    np.testing.assert_allclose(to_flambda(f, "erg/s/cm2/A", w), f)  # bare A read as Angstrom
    np.testing.assert_allclose(to_flambda(f, "1e-17 erg/s/cm2/Angstrom", w), f * 1e-17)
    # 1 W m-2 nm-1 = 1e7 erg s-1 / 1e4 cm2 / 10 A = 100 erg s-1 cm-2 A-1
    np.testing.assert_allclose(to_flambda(f, "W/m2/nm", w), f * 100.0)


def test_flat_fnu_becomes_lambda_minus_two():
    w = np.linspace(3000.0, 10000.0, 50)
    out = to_flambda(np.ones_like(w), "Jy", w)
    np.testing.assert_allclose(out * w**2, (out * w**2)[0], rtol=1e-12)
    np.testing.assert_allclose(out, 1e-23 * C_AA_PER_S / w**2, rtol=1e-10)


@given(w=hnp.arrays(np.float64, 20, elements=st.floats(1000.0, 50000.0)),
       f=hnp.arrays(np.float64, 20, elements=st.floats(-1e3, 1e3)))
@FAST
def test_fnu_to_flambda_matches_analytic_factor_and_astropy(w, f):
    expected = f * C_AA_PER_S / w**2
    np.testing.assert_allclose(to_flambda(f, "erg / (s cm2 Hz)", w), expected, rtol=1e-10, atol=1e-300)
    via_astropy = (f * u.mJy).to_value(u.erg / u.s / u.cm**2 / u.AA, equivalencies=u.spectral_density(w * u.AA))
    np.testing.assert_allclose(to_flambda(f, "mJy", w), via_astropy, rtol=1e-10, atol=1e-300)


def test_magnitudes_and_photon_flux_match_astropy():
    w = np.array([3500.0, 5500.0, 9000.0])
    mags = np.array([18.0, 19.5, 21.0])
    for unit, mag_unit in (("mag(AB)", u.ABmag), ("ABmag", u.ABmag), ("mag(ST)", u.STmag)):
        expected = (mags * mag_unit).physical.to_value(u.erg / u.s / u.cm**2 / u.AA,
                                                       equivalencies=u.spectral_density(w * u.AA))
        np.testing.assert_allclose(to_flambda(mags, unit, w), expected, rtol=1e-10)
    # AB zero point by hand: m = 0 is 10**(-0.4 * 48.6) erg s-1 cm-2 Hz-1
    np.testing.assert_allclose(to_flambda(np.zeros(3), "mag(AB)", w), 10 ** (-0.4 * 48.6) * C_AA_PER_S / w**2,
                               rtol=1e-10)
    photons = np.array([1.0, 2.0, 3.0])
    expected = (photons * u.photon / u.s / u.cm**2 / u.AA).to_value(
        u.erg / u.s / u.cm**2 / u.AA, equivalencies=u.spectral_density(w * u.AA))
    np.testing.assert_allclose(to_flambda(photons, "photlam", w), expected, rtol=1e-10)


@pytest.mark.parametrize("unit", ["", "dimensionless", "arbitrary", "count", "counts", "ct / s", "adu"])
def test_arbitrary_flux_units_are_kept(unit):
    f = np.array([1.0, -2.0, 3.5])
    np.testing.assert_array_equal(to_flambda(f, unit, np.array([4000.0, 5000.0, 6000.0])), f)


@pytest.mark.parametrize("unit", ["furlongs per fortnight", "km", "erg / s", "mag", "K"])
def test_to_flambda_rejects_unknown_and_wrong_type(unit):
    with pytest.raises(UnitError) as info:
        to_flambda(np.ones(2), unit, np.array([4000.0, 5000.0]))
    assert info.value.field == "flux_unit"


@pytest.mark.parametrize("unit", ["erg/s/cm2/Ang", "erg/s/cm2/Angs", "erg / (s cm2 Angstroms)", "erg/s/cm2/ANGSTROM"])
def test_angstrom_spellings_inside_a_flux_unit(unit):
    # Only the file readers' alias table knew these before streamer/science/units.py; packets read them now too.
    w = np.array([4000.0, 6000.0])
    f = np.array([1.0, 2.0])
    np.testing.assert_allclose(to_flambda(f, unit, w), f)


@pytest.mark.parametrize("unit", ["Angstroms", "ANGSTROM", "Ang", "10 A"])
def test_angstrom_spellings_as_a_wavelength_unit(unit):
    w = np.array([4000.0, 6000.0])
    np.testing.assert_allclose(to_angstrom(w, unit), w * (10.0 if unit.startswith("10") else 1.0), rtol=1e-12)


@pytest.mark.parametrize("unit", ["erg/s/cm2/A", "flam", "fnu", "mJy", "W/m2/nm", "1e-17 erg/s/cm2/Angstrom",
                                  "mag(AB)", "ABmag", "STmag", "photlam", "ph/s/cm2/Hz", "adu", "count", "ct / s",
                                  "counts", "arbitrary", ""])
def test_canonical_flux_unit_name_reads_back_the_same(unit):
    # a reader stores units.flux_unit(text).name; preprocessing must read that name as the text it came from
    first = units.flux_unit(unit)
    again = units.flux_unit(first.name)
    assert (again.kind, again.magnitude) == (first.kind, first.magnitude)
    assert again.scale == pytest.approx(first.scale, rel=1e-12)
    assert first.calibrated == (first.kind != "arbitrary")


# ------------------------------------------------------------------------------------------------------ wavelength


@pytest.mark.parametrize("air, vacuum", [(6562.80, 6564.61), (5006.84, 5008.24), (6583.45, 6585.27),
                                         (3726.03, 3727.09)])  # H-alpha, [O III], [N II], [O II] (SDSS line list)
def test_air_to_vacuum_known_lines(air, vacuum):
    assert air_to_vacuum(np.array([air]))[0] == pytest.approx(vacuum, abs=0.03)


def test_air_to_vacuum_passes_tiny_wavelengths_through_without_overflow():
    w = np.array([1e-300, 0.0, 1500.0, 6562.8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupted packet's wavelengths once raised "overflow encountered in divide"
        out = air_to_vacuum(w)
    np.testing.assert_array_equal(out[:3], w[:3])
    assert out[3] == pytest.approx(6564.61, abs=0.03)


def test_air_to_vacuum_inverts_morton_and_leaves_uv_alone():
    vac = np.linspace(2100.0, 25000.0, 500)
    np.testing.assert_allclose(air_to_vacuum(_morton_vacuum_to_air(vac)), vac, rtol=2e-8)
    uv = np.array([1215.67, 1549.0, 1999.0])
    np.testing.assert_array_equal(air_to_vacuum(uv), uv)


def test_rest_frame():
    np.testing.assert_allclose(rest_frame(np.array([6600.0, 7700.0]), 0.1), [6000.0, 7000.0])
    for z in (-1.0, -2.0, math.nan, math.inf):
        with pytest.raises(PreprocessError) as info:
            rest_frame(np.array([5000.0]), z)
        assert info.value.field == "redshift"


# ----------------------------------------------------------------------------------------------------------- clean


def test_clean_sorts_drops_and_averages_duplicates():
    w = np.array([5003.0, 5001.0, 5002.0, 5002.0, np.nan, 5004.0, 5005.0, 5006.0])
    f = np.array([3.0, 1.0, 2.0, 4.0, 9.0, np.inf, 5.0, 6.0])
    e = np.array([0.3, 0.1, 0.3, 0.4, 0.1, 0.1, -1.0, 0.6])
    mask = np.array([0, 0, 0, 0, 0, 0, 0, 1])
    out = clean(w, f, e, mask, min_valid_pixels=2)
    np.testing.assert_array_equal(out.wavelength, [5001.0, 5002.0, 5003.0])
    np.testing.assert_allclose(out.flux, [1.0, 3.0, 3.0])  # duplicates at 5002 averaged
    assert out.flux_err is not None
    np.testing.assert_allclose(out.flux_err, [0.1, 0.25, 0.3])  # sqrt(0.3^2 + 0.4^2) / 2
    assert out.n_dropped == 4  # nan wavelength, inf flux, negative error, masked


def test_clean_without_errors_or_mask_keeps_sorted_input():
    w = np.linspace(4000.0, 5000.0, 30)
    out = clean(w, np.ones(30))
    np.testing.assert_array_equal(out.wavelength, w)
    assert out.flux_err is None and out.n_dropped == 0


@pytest.mark.parametrize("name", ["flux", "flux_err", "mask"])
def test_clean_length_mismatch_names_the_field(name):
    arrays: dict[str, Any] = {"flux": np.ones(30), "flux_err": np.ones(30), "mask": np.zeros(30, dtype=bool)}
    arrays[name] = arrays[name][:-1]
    with pytest.raises(LengthMismatchError) as info:
        clean(np.linspace(4000.0, 5000.0, 30), **arrays)
    assert info.value.field == name


def test_clean_errors():
    w = np.linspace(4000.0, 5000.0, 30)
    with pytest.raises(NonPositiveWavelengthError) as negative:
        clean(np.concatenate(([-1.0], w[1:])), np.ones(30))
    assert negative.value.field == "wavelength"
    f = np.ones(30)
    f[:15] = np.nan
    with pytest.raises(TooFewPixelsError) as too_few:
        clean(w, f, min_valid_pixels=20)
    assert too_few.value.field == "flux"
    with pytest.raises(TooFewPixelsError):
        clean(w, np.ones(30), mask=np.arange(30) < 11, min_valid_pixels=20)
    with pytest.raises(PreprocessError) as info:
        clean(w.reshape(5, 6), np.ones((5, 6)))
    assert info.value.field == "wavelength"


# ----------------------------------------------------------------------------------------------------------- rebin


@st.composite
def _spectrum_and_inner_edges(draw):
    n = draw(st.integers(5, 120))
    start = draw(st.floats(1000.0, 9000.0))
    base = draw(st.floats(0.05, 20.0))
    steps = draw(hnp.arrays(np.float64, n - 1, elements=st.floats(0.6, 1.5))) * base  # ratio 2.5 < gap factor 3
    wave = start + np.concatenate(([0.0], np.cumsum(steps)))
    flux = draw(hnp.arrays(np.float64, n, elements=st.floats(1e-3, 1e3)))
    lo = wave[0] - steps[0] / 2
    hi = wave[-1] + steps[-1] / 2
    m = draw(st.integers(1, 60))
    widths = draw(hnp.arrays(np.float64, m, elements=st.floats(1e-3, 1.0)))  # relative output bin widths
    cuts = np.concatenate(([0.0], np.cumsum(widths))) / widths.sum()
    a = draw(st.floats(0.0, 0.45))
    b = draw(st.floats(0.55, 1.0))
    edges = lo + (a + cuts * (b - a)) * (hi - lo)
    return wave, flux, edges


@given(_spectrum_and_inner_edges())
@settings(max_examples=150, deadline=None)
def test_rebin_conserves_flux_on_random_grids(case):
    wave, flux, edges = case
    out, _, coverage = rebin(wave, flux, edges)
    assert coverage.all()  # every output bin lies inside the input
    ref_flux, _, _ = _reference_rebin(wave, flux, edges)
    integral_in = np.sum(ref_flux * np.diff(edges))  # brute-force integral of the input over [edges[0], edges[-1]]
    integral_out = np.sum(out * np.diff(edges))
    assert integral_out == pytest.approx(integral_in, rel=1e-6)
    np.testing.assert_allclose(out, ref_flux, rtol=1e-6)


@given(_spectrum_and_inner_edges(), st.floats(0.2, 3.0))
@FAST
def test_rebin_matches_brute_force_including_errors_and_partial_bins(case, stretch):
    wave, flux, inner = case
    centre = (inner[0] + inner[-1]) / 2
    edges = centre + (inner - centre) * stretch  # stretched grids also poke out of the input range
    err = 0.01 * flux + 0.1
    out, out_err, coverage = rebin(wave, flux, edges, err)
    assert out_err is not None
    ref_flux, ref_err, frac = _reference_rebin(wave, flux, edges, err)
    np.testing.assert_array_equal(coverage, frac >= 0.99 - 1e-9)
    np.testing.assert_allclose(out[coverage], ref_flux[coverage], rtol=1e-6)
    np.testing.assert_allclose(out_err[coverage], ref_err[coverage], rtol=1e-6)
    assert np.all(out[~coverage] == 0) and np.all(out_err[~coverage] == 0)


def test_rebin_stays_accurate_for_narrow_bins_among_large_fluxes():
    # a running integral differenced at the edges loses ~all precision here; per-bin sums must not
    rng = np.random.default_rng(7)
    wave = 4000.0 + np.cumsum(rng.uniform(0.6, 1.5, 100))
    flux = np.where(np.arange(100) % 2 == 0, 1e3, 1e-3)
    narrow = wave[41:60:2] + 0.1  # 1e-4 A wide bins inside faint pixels, after many bright ones
    edges = np.sort(np.concatenate((np.linspace(wave[10], wave[90], 30), narrow, narrow + 1e-4)))
    err = 0.01 * flux + 0.1
    out, out_err, cov = rebin(wave, flux, edges, err)
    ref, ref_err, _ = _reference_rebin(wave, flux, edges, err)
    assert cov.all() and out_err is not None
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    np.testing.assert_allclose(out_err, ref_err, rtol=1e-6)


def test_rebin_onto_own_pixels_is_identity_and_errors_average_down():
    wave = np.linspace(5000.0, 5099.0, 100)
    flux = np.random.default_rng(1).normal(10.0, 1.0, 100)
    edges = np.concatenate(([wave[0] - 0.5], wave + 0.5))
    out, err, cov = rebin(wave, flux, edges, np.full(100, 2.0))
    assert err is not None
    np.testing.assert_allclose(out, flux, rtol=1e-10)
    np.testing.assert_allclose(err, 2.0, rtol=1e-10)
    assert cov.all()
    coarse = np.linspace(edges[0], edges[-1], 11)  # 10 pixels per bin
    out, err, cov = rebin(wave, flux, coarse, np.full(100, 2.0))
    assert err is not None
    np.testing.assert_allclose(out, flux.reshape(10, 10).mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(err, 2.0 / math.sqrt(10), rtol=1e-10)


def test_rebin_coverage_marks_bins_outside_and_in_gaps():
    wave = np.arange(5000.0, 6000.0, 1.0)
    keep = (wave < 5400.0) | (wave > 5600.0)  # a 200 A hole, e.g. a chip gap
    edges = np.linspace(4500.0, 6500.0, 201)  # 10 A bins
    centers = (edges[1:] + edges[:-1]) / 2
    out, _, cov = rebin(wave[keep], np.full(keep.sum(), 3.0), edges)
    inside = (edges[:-1] >= 4999.5) & (edges[1:] <= 5399.5) | (edges[:-1] >= 5600.5) & (edges[1:] <= 5999.5)
    outside = (centers < 5000.0) | (centers > 6000.0) | ((centers > 5410.0) & (centers < 5590.0))
    assert cov[inside].all()
    assert not cov[outside].any()
    np.testing.assert_allclose(out[cov], 3.0)
    assert np.all(out[~cov] == 0.0)
    # without gap detection the hole is bridged by the neighbouring pixels
    _, _, bridged = rebin(wave[keep], np.full(keep.sum(), 3.0), edges, gap_factor=None)
    assert bridged[(centers > 5410.0) & (centers < 5590.0)].all()


def test_rebin_rejects_unsorted_input():
    with pytest.raises(PreprocessError):
        rebin(np.array([2.0, 1.0, 3.0]), np.ones(3), np.array([1.0, 2.0]))


# --------------------------------------------------------------------------------------------------- normalisation


@given(hnp.arrays(np.float64, 64, elements=st.one_of(st.floats(-1e3, -1e-3), st.floats(1e-3, 1e3))),
       st.floats(1e-20, 1e20))
@FAST
def test_normalise_robust_is_scale_invariant_and_order_one(flux, k):
    coverage = np.arange(64) % 5 != 0
    out = normalise_robust(flux, coverage)
    np.testing.assert_allclose(normalise_robust(flux * k, coverage), out, rtol=1e-9, atol=1e-12)
    assert np.median(np.abs(out[coverage])) == pytest.approx(1.0)
    assert np.all(out[~coverage] == 0.0)


def test_normalise_robust_edge_cases():
    cov = np.ones(10, dtype=bool)
    np.testing.assert_allclose(normalise_robust(np.full(10, 7.0), cov), 1.0)
    mostly_zero = np.zeros(10)
    mostly_zero[3] = 5.0
    out = normalise_robust(mostly_zero, cov)
    assert np.all(np.isfinite(out)) and out[3] > 0
    with pytest.raises(PreprocessError) as info:
        normalise_robust(np.zeros(10), cov)
    assert info.value.field == "flux"
    with pytest.raises(PreprocessError) as info:
        normalise_robust(np.zeros(10), ~cov)
    assert info.value.field == "wavelength"


def _grid_spectrum(line_amp=0.0, coverage_slice=slice(None)):
    grid = Grid(3500.0, 10000.0, 1024)
    centers = grid.centers()
    line = line_amp * np.exp(-0.5 * ((centers - 6000.0) / 25.0) ** 2)
    flux = 3e-16 * _smooth_continuum(centers) * (1.0 + line)
    coverage = np.zeros(1024, dtype=bool)
    coverage[coverage_slice] = True
    return centers, np.where(coverage, flux, 0.0), coverage, line


@pytest.mark.parametrize("amp", [0.5, -0.4, 2.0])
def test_remove_continuum_recovers_a_gaussian_line(amp):
    centers, flux, coverage, line = _grid_spectrum(line_amp=amp)
    out = remove_continuum(flux, coverage, 13)
    peak = np.argmin(np.abs(centers - 6000.0))
    assert out[peak] == pytest.approx(amp, abs=0.05 * abs(amp))
    far = (np.abs(centers - 6000.0) > 150.0) & (np.arange(1024) > 60) & (np.arange(1024) < 1024 - 60)
    assert np.max(np.abs(out[far])) < 0.03
    near = np.abs(centers - 6000.0) < 100.0
    assert np.corrcoef(out[near], line[near])[0, 1] > 0.99


def test_remove_continuum_with_noise_is_unbiased():
    centers, flux, coverage, line = _grid_spectrum(line_amp=0.5)
    noisy = flux * (1 + 0.05 * np.random.default_rng(3).standard_normal(flux.size))
    out = remove_continuum(noisy, coverage, 13)
    far = (np.abs(centers - 6000.0) > 150.0) & (np.arange(1024) > 60) & (np.arange(1024) < 1024 - 60)
    assert abs(np.mean(out[far])) < 0.005
    assert np.std(out[far]) == pytest.approx(0.05, rel=0.2)
    near = np.abs(centers - 6000.0) < 10.0
    np.testing.assert_allclose(np.mean(out[near] - line[near]), 0.0, atol=0.05)


def test_remove_continuum_flat_result_apodised_edges_and_partial_coverage():
    centers, flux, coverage, _ = _grid_spectrum(coverage_slice=slice(200, 900))
    out = remove_continuum(flux, coverage, 13)
    assert np.all(out[:200] == 0.0) and np.all(out[900:] == 0.0)
    assert np.max(np.abs(out[coverage])) < 0.03
    doubled = flux * 2.0  # a constant factor changes nothing: flux / continuum - 1
    np.testing.assert_allclose(remove_continuum(doubled, coverage, 13), out, atol=1e-12)
    # an excess right at the blue edge (narrower than half a knot chunk, so the continuum ignores it)
    # is tapered towards zero by the cosine bell
    bumped = flux.copy()
    bumped[200:215] *= 2.0
    tapered = remove_continuum(bumped, coverage, 13)
    assert tapered[213] > 0.2
    assert abs(tapered[200]) < 0.1 * tapered[213]


def test_natural_cubic_spline_matches_scipy():
    interpolate = pytest.importorskip("scipy.interpolate")
    x = np.sort(np.random.default_rng(5).uniform(0.0, 100.0, 13))
    y = np.sin(x / 10.0)
    x_eval = np.linspace(-20.0, 120.0, 700)
    reference = interpolate.CubicSpline(x, y, bc_type="natural")
    got = pp._natural_cubic_spline(x, y, x_eval)
    inside = (x_eval >= x[0]) & (x_eval <= x[-1])
    np.testing.assert_allclose(got[inside], reference(x_eval[inside]), atol=1e-12)
    left, right = x_eval < x[0], x_eval > x[-1]  # linear beyond the ends, with the end slopes
    np.testing.assert_allclose(got[left], y[0] + (x_eval[left] - x[0]) * reference(x[0], 1), atol=1e-12)
    np.testing.assert_allclose(got[right], y[-1] + (x_eval[right] - x[-1]) * reference(x[-1], 1), atol=1e-12)


def test_remove_continuum_errors():
    with pytest.raises(PreprocessError):
        remove_continuum(np.zeros(50), np.ones(50, dtype=bool), 5)
    with pytest.raises(NoOverlapError):
        remove_continuum(np.ones(50), np.zeros(50, dtype=bool), 5)


# ------------------------------------------------------------------------------------------------------------- S/N


def test_der_snr_estimates_gaussian_noise():
    rng = np.random.default_rng(42)
    flux = 50.0 + rng.normal(0.0, 2.0, 20000)
    assert der_snr(flux) == pytest.approx(25.0, rel=0.05)
    assert median_snr(flux) == der_snr(flux)
    assert math.isnan(der_snr(np.array([1.0, 2.0, 3.0])))
    assert math.isnan(der_snr(np.full(100, 5.0)))  # noiseless: no finite estimate


def test_median_snr_with_errors():
    flux = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    err = np.array([1.0, 1.0, 0.0, np.nan, 5.0])
    assert median_snr(flux, err) == pytest.approx(10.0)  # median of 10, 20, 10
    assert math.isnan(median_snr(flux, np.zeros(5)))


# --------------------------------------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def sn2010jn():
    return _read_osc(SPECTRUM)


@pytest.mark.parametrize("normalisation", ["robust", "continuum"])
def test_prepare_real_spectrum(sn2010jn, normalisation):
    header, wave, flux = sn2010jn
    cfg = PreprocessConfig(normalisation=normalisation, to_rest_frame=True)
    p = prepare(wave, flux, flux_unit="", redshift=float(header["redshift"]),
                flux_calibrated=header["flux_kind"] != "uncalibrated", config=cfg)
    assert p.flux.dtype == np.float32 and p.flux.shape == (1024,)
    assert p.coverage.dtype == bool and p.coverage.shape == (1024,)
    assert 0.5 < p.coverage_fraction <= 1.0
    assert p.coverage_fraction == pytest.approx(p.coverage.mean())
    assert np.all(np.isfinite(p.flux)) and np.all(p.flux[~p.coverage] == 0.0)
    assert 0.05 < np.max(np.abs(p.flux)) < 20.0
    assert 3.0 < p.median_snr < 1000.0
    assert {"no_flux_err", "uncalibrated"} <= set(p.flags)
    assert set(p.flags) <= set(pp.FLAGS)
    with pytest.raises(ValueError):
        p.flux[0] = 1.0


def _synthetic(n=2000, lo=3000.0, hi=11000.0, seed=0):
    wave = np.linspace(lo, hi, n)
    rng = np.random.default_rng(seed)
    flux = 1e-16 * _smooth_continuum(wave) * (1 + 0.8 * np.exp(-0.5 * ((wave - 6563.0) / 20.0) ** 2))
    return wave, flux * (1 + 0.01 * rng.standard_normal(n))


def test_prepare_is_unit_invariant():
    wave, flambda = _synthetic()
    reference = prepare(wave, flambda)
    fnu_jy = flambda * wave**2 / C_AA_PER_S / 1e-23  # F_nu in Jy, by hand
    other = prepare(wave / 10.0, fnu_jy, wavelength_unit="nm", flux_unit="Jy")
    np.testing.assert_allclose(other.flux, reference.flux, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(other.coverage, reference.coverage)
    nu = C_AA_PER_S / wave
    by_frequency = prepare(nu, fnu_jy * 1e3, wavelength_unit="Hz", flux_unit="mJy")  # decreasing: clean sorts
    np.testing.assert_allclose(by_frequency.flux, reference.flux, rtol=1e-5, atol=1e-6)


def test_prepare_air_vacuum_and_rest_frame_move_the_line():
    centers = PreprocessConfig().grid.centers()
    wave = np.linspace(3000.0, 11000.0, 4000)
    flux = 1.0 + 0.8 * np.exp(-0.5 * ((wave - 6563.0) / 20.0) ** 2)  # flat continuum: the centroid is unbiased

    def peak(p, around=6563.0):  # line centroid, to a small fraction of a bin
        window = np.abs(centers - around) < 120.0
        excess = p.flux[window] - np.median(p.flux[p.coverage])
        return float(np.sum(centers[window] * excess) / np.sum(excess))

    air = prepare(wave, flux, medium="air")
    vacuum = prepare(wave, flux, medium="vacuum")
    assert peak(vacuum) == pytest.approx(6563.0, abs=0.5)
    assert peak(air) - peak(vacuum) == pytest.approx(6563.0 * 2.77e-4, abs=0.3)  # n_air - 1 near H-alpha
    z = 0.05
    shifted = prepare(wave * (1 + z), flux, medium="vacuum", redshift=z,
                      config=PreprocessConfig(to_rest_frame=True))
    assert peak(shifted) == pytest.approx(6563.0, abs=0.5)
    unshifted = prepare(wave * (1 + z), flux, medium="vacuum", config=PreprocessConfig(to_rest_frame=True))
    assert "no_redshift" in unshifted.flags
    assert peak(unshifted, around=6563.0 * (1 + z)) == pytest.approx(6563.0 * (1 + z), abs=0.5)


def test_prepare_flags_mask_and_errors():
    wave, flux = _synthetic()
    err = 0.01 * flux
    full = prepare(wave, flux, flux_err=err, medium="vacuum")
    assert full.flags == () and full.coverage.all()
    assert full.median_snr == pytest.approx(100.0, rel=0.05)
    hole = (wave > 5000.0) & (wave < 5300.0)
    gapped = prepare(wave, flux, flux_err=err, mask=hole, medium="vacuum", flux_calibrated=False)
    assert {"coverage_gaps", "partial_coverage", "dropped_pixels", "uncalibrated"} <= set(gapped.flags)
    centers = PreprocessConfig().grid.centers()
    assert not gapped.coverage[(centers > 5020.0) & (centers < 5280.0)].any()
    negative = prepare(wave, flux - 2 * np.median(flux), medium="vacuum")
    assert "negative_flux" in negative.flags


@pytest.mark.parametrize("kwargs, error, field", [
    ({"wavelength": np.linspace(20000.0, 30000.0, 500)}, NoOverlapError, "wavelength"),
    ({"wavelength": np.linspace(3400.0, 3700.0, 500)}, TooFewPixelsError, "wavelength"),
    ({"wavelength": np.linspace(4000.0, 9000.0, 10)}, TooFewPixelsError, "flux"),
    ({"flux": np.ones(499)}, LengthMismatchError, "flux"),
    ({"flux_err": np.ones(10)}, LengthMismatchError, "flux_err"),
    ({"mask": np.zeros(10, dtype=bool)}, LengthMismatchError, "mask"),
    ({"wavelength": np.linspace(-10.0, 9000.0, 500)}, NonPositiveWavelengthError, "wavelength"),
    ({"wavelength_unit": "furlong"}, UnitError, "wavelength_unit"),
    ({"flux_unit": "kg"}, UnitError, "flux_unit"),
    ({"medium": "water"}, PreprocessError, "medium"),
    ({"redshift": -1.5}, PreprocessError, "redshift"),
    ({"flux": np.zeros(500)}, PreprocessError, "flux"),
])
def test_prepare_errors_name_the_field(kwargs, error, field):
    args: dict[str, Any] = {"wavelength": np.linspace(4000.0, 9000.0, 500)}
    args.update(kwargs)
    wavelength = args.pop("wavelength")
    flux = args.pop("flux", np.ones(wavelength.size))
    with pytest.raises(error) as info:
        prepare(wavelength, flux, **args)
    assert info.value.field == field
