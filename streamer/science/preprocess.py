"""Spectrum preprocessing: from a packet's arrays and metadata to the model's input vector.

Every step is a small pure numpy function so that it can be tested alone and so that training and the daemon run
exactly the same code. ``prepare`` chains them:

    units -> clean -> air to vacuum -> rest frame -> flux-conserving rebin -> normalise -> S/N and flags

Units are read and converted by ``units`` (the one home of unit strings, shared with the file readers);
``to_angstrom`` and ``to_flambda`` are re-exported here because they are the first step of this chain.

The model grid is log-uniform in *vacuum* Angstrom. Only the shape of the spectrum matters after normalisation, but
every conversion is physically right so that intermediate results can be trusted and tested against astropy.

``PREPROCESS_VERSION`` must be bumped whenever ``prepare`` gives a different output for the same input: checkpoints
record it, and a model must only be fed the preprocessing it was trained on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Literal, Mapping, NamedTuple

import numpy as np
from spectranet.streamer.errors import (
    ConfigError,
    LengthMismatchError,
    NonPositiveWavelengthError,
    NoOverlapError,
    PreprocessError,
    TooFewPixelsError,
)
from spectranet.streamer.science import units
from spectranet.streamer.science.units import to_angstrom, to_flambda

__all__ = [
    "PREPROCESS_VERSION",
    "SUPPORTED_PREPROCESS_VERSIONS",
    "FLAGS",
    "Grid",
    "PreprocessConfig",
    "Prepared",
    "Cleaned",
    "Rebinned",
    "to_angstrom",
    "to_flambda",
    "air_to_vacuum",
    "clean",
    "rest_frame",
    "rebin",
    "normalise_robust",
    "remove_continuum",
    "der_snr",
    "median_snr",
    "prepare",
]

# 1.1: normalised flux is clipped to +-NORMALISED_LIMIT (1.0 overflowed float32 on extreme spikes); otherwise equal,
# so checkpoints made with 1.0 stay supported.
PREPROCESS_VERSION: str = "1.1"
SUPPORTED_PREPROCESS_VERSIONS: frozenset[str] = frozenset({"1.0", "1.1"})

FloatArray = np.ndarray  # float64 [n] unless stated
Normalisation = Literal["robust", "continuum"]
Medium = Literal["air", "vacuum"]
Frame = Literal["observed", "rest"]

# Quality flags ``prepare`` may set; documented here so that consumers can rely on the exact strings.
FLAGS: Mapping[str, str] = MappingProxyType({
    "no_flux_err": "no error array was given; median_snr is a DER_SNR estimate from the flux itself",
    "partial_coverage": "the spectrum does not cover every grid bin",
    "coverage_gaps": "the covered bins are not contiguous (masked regions or gaps in the input)",
    "negative_flux": "more than 1% of the covered bins have negative flux",
    "uncalibrated": "flux is in arbitrary units, or the packet says it is not flux calibrated",
    "dropped_pixels": "some input pixels were masked or non-finite and were dropped",
    "clipped": f"some normalised flux exceeded +-{100:g} times the robust scale (spikes, cosmic rays) and was clipped",
    "no_redshift": "rest frame was requested but no redshift was given; the spectrum stays in the observed frame",
})
_NEGATIVE_FLUX_FRACTION = 0.01
NORMALISED_LIMIT = 100.0  # model input never exceeds this magnitude: one wild pixel must not overflow float32
_CLIP_PASSES = 2  # continuum fit: refits after clipping lines (the first fit is biased near strong lines)
_MIN_CLIP = 0.02  # continuum fit: residuals within 2% are never clipped (noiseless spectra have sigma ~ 0)

_AIR_VACUUM_MIN_AA = 2000.0  # IAU convention: wavelengths below 2000 A are always quoted in vacuum


# ---------------------------------------------------------------------------------------------------------- config


def _is_int_at_least(value: object, lowest: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lowest


@dataclass(frozen=True)
class Grid:
    """Log-uniform wavelength grid in vacuum Angstrom; ``wave_min`` and ``wave_max`` are the outer bin edges."""

    wave_min: float
    wave_max: float
    n_bins: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.wave_min) and math.isfinite(self.wave_max) and 0 < self.wave_min < self.wave_max):
            raise ConfigError(f"grid needs 0 < wave_min < wave_max, got {self.wave_min}, {self.wave_max}")
        if not _is_int_at_least(self.n_bins, 2):
            raise ConfigError(f"grid needs an integer n_bins >= 2, got {self.n_bins!r}")

    def edges(self) -> FloatArray:
        """The n_bins + 1 log-spaced bin edges (read-only, cached: the daemon asks for them on every packet)."""
        return _grid_edges(float(self.wave_min), float(self.wave_max), self.n_bins)

    def centers(self) -> FloatArray:
        """Geometric bin centres, i.e. uniform in log wavelength like the edges."""
        return _grid_centers(float(self.wave_min), float(self.wave_max), self.n_bins)

    def to_dict(self) -> dict[str, Any]:
        return {"wave_min": float(self.wave_min), "wave_max": float(self.wave_max), "n_bins": int(self.n_bins)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Grid:
        _reject_unknown_keys(d, {"wave_min", "wave_max", "n_bins"}, "grid")
        try:
            return cls(wave_min=float(d["wave_min"]), wave_max=float(d["wave_max"]), n_bins=int(d["n_bins"]))
        except KeyError as exc:
            raise ConfigError(f"grid is missing key {exc.args[0]!r}") from exc


@functools.lru_cache(maxsize=32)
def _grid_edges(wave_min: float, wave_max: float, n_bins: int) -> FloatArray:
    edges = np.geomspace(wave_min, wave_max, n_bins + 1)
    edges.setflags(write=False)
    return edges


@functools.lru_cache(maxsize=32)
def _grid_centers(wave_min: float, wave_max: float, n_bins: int) -> FloatArray:
    edges = _grid_edges(wave_min, wave_max, n_bins)
    centers: FloatArray = np.sqrt(edges[:-1] * edges[1:])
    centers.setflags(write=False)
    return centers


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes what ``prepare`` produces; a checkpoint stores ``to_dict()`` next to the weights."""

    grid: Grid = Grid(3500.0, 10000.0, 1024)
    normalisation: Normalisation = "robust"
    min_valid_pixels: int = 20  # usable input pixels, before rebinning
    min_coverage: float = 0.1  # fraction of grid bins the spectrum must cover
    continuum_knots: int = 13  # spline knots of the SNID-style continuum fit
    to_rest_frame: bool = False  # de-redshift when the packet gives a redshift

    def __post_init__(self) -> None:
        if not isinstance(self.grid, Grid):
            raise ConfigError(f"grid must be a Grid, got {type(self.grid).__name__}")
        if self.normalisation not in ("robust", "continuum"):
            raise ConfigError(f"normalisation must be 'robust' or 'continuum', got {self.normalisation!r}")
        if not _is_int_at_least(self.min_valid_pixels, 2):
            raise ConfigError(f"min_valid_pixels must be an integer >= 2, got {self.min_valid_pixels!r}")
        if not (0.0 <= self.min_coverage <= 1.0):
            raise ConfigError(f"min_coverage must lie in [0, 1], got {self.min_coverage!r}")
        if not _is_int_at_least(self.continuum_knots, 2):
            raise ConfigError(f"continuum_knots must be an integer >= 2, got {self.continuum_knots!r}")
        if not isinstance(self.to_rest_frame, bool):
            raise ConfigError(f"to_rest_frame must be a bool, got {self.to_rest_frame!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = self.grid.to_dict()
        d["version"] = PREPROCESS_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Rebuild a config; missing keys take their defaults, unknown keys and unsupported versions raise."""
        _reject_unknown_keys(d, {"grid", "normalisation", "min_valid_pixels", "min_coverage", "continuum_knots",
                                 "to_rest_frame", "version"}, "preprocess config")
        version = d.get("version", PREPROCESS_VERSION)
        if version not in SUPPORTED_PREPROCESS_VERSIONS:
            raise ConfigError(f"preprocess version {version!r} is not supported by this code "
                              f"(supported: {sorted(SUPPORTED_PREPROCESS_VERSIONS)})")
        kwargs = {k: v for k, v in d.items() if k not in ("grid", "version")}
        if "grid" in d:
            kwargs["grid"] = d["grid"] if isinstance(d["grid"], Grid) else Grid.from_dict(d["grid"])
        return cls(**kwargs)


def _reject_unknown_keys(d: Mapping[str, Any], known: set[str], what: str) -> None:
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"{what} has unknown keys {sorted(unknown)}")


@dataclass(frozen=True, eq=False)
class Prepared:
    """Model input for one spectrum, with the quality information the daemon stores next to the prediction."""

    flux: np.ndarray  # float32 [n_bins], normalised, 0 outside coverage
    coverage: np.ndarray  # bool [n_bins], True where the input spectrum covers the bin (never extrapolated)
    coverage_fraction: float
    median_snr: float  # per input pixel; nan when it cannot be estimated
    flags: tuple[str, ...]

    def model_input(self) -> np.ndarray:
        """The network's two input channels, float32 [2, n_bins]: normalised flux and coverage (the one place
        they are stacked; inference, simulation and evaluation all call it)."""
        return np.stack([self.flux, self.coverage.astype(np.float32)])


class Cleaned(NamedTuple):
    """Sorted, de-duplicated, finite input pixels."""

    wavelength: FloatArray
    flux: FloatArray
    flux_err: FloatArray | None
    n_dropped: int  # masked or non-finite input pixels (merged duplicates are not counted)


class Rebinned(NamedTuple):
    """Output of ``rebin``; unpacks as ``flux, err, coverage``."""

    flux: FloatArray  # [n_out], mean flux density over the covered part of each bin, 0 where not covered
    flux_err: FloatArray | None  # [n_out], propagated 1-sigma error, 0 where not covered
    coverage: np.ndarray  # bool [n_out]


# ----------------------------------------------------------------------------------------------------- wavelength


def air_to_vacuum(wavelength_aa: FloatArray) -> FloatArray:
    """Vacuum wavelengths from air ones, in Angstrom.

    Uses the inverse of the Morton (2000) / IAU refractive index as given by N. Piskunov for VALD (the same formula
    as SDSS and specutils); accurate to ~1e-8 relative. Below 2000 A wavelengths are vacuum by convention and pass
    through unchanged.
    """
    w = np.asarray(wavelength_aa, dtype=np.float64)
    s2 = (1e4 / np.maximum(w, _AIR_VACUUM_MIN_AA)) ** 2  # below the minimum w passes through: no overflow from it
    n = 1.0 + 8.336624212083e-5 + 2.408926869968e-2 / (130.1065924522 - s2) + 1.599740894897e-4 / (38.92568793293 - s2)
    return np.where(w >= _AIR_VACUUM_MIN_AA, w * n, w)


def rest_frame(wavelength: FloatArray, redshift: float) -> FloatArray:
    """Rest-frame wavelengths lambda / (1 + z).

    F_lambda would also scale by (1 + z); that constant factor is removed by normalisation, so it is not applied.
    """
    if not (math.isfinite(redshift) and redshift > -1.0):
        raise PreprocessError(f"redshift must be finite and > -1, got {redshift!r}", field="redshift")
    return np.asarray(wavelength, dtype=np.float64) / (1.0 + redshift)


# ---------------------------------------------------------------------------------------------------------- clean


def _as_1d(name: str, values: Any, dtype: type = np.float64) -> np.ndarray:
    arr: np.ndarray = np.asarray(values, dtype=dtype)
    if arr.ndim != 1:
        raise PreprocessError(f"{name} must be one-dimensional, got shape {arr.shape}", field=name)
    return arr


def _check_lengths(n: int, **arrays: np.ndarray | None) -> None:
    for name, arr in arrays.items():
        if arr is not None and arr.shape[0] != n:
            raise LengthMismatchError(f"{name} has {arr.shape[0]} values but wavelength has {n}", field=name)


def clean(
    wavelength: FloatArray,
    flux: FloatArray,
    flux_err: FloatArray | None = None,
    mask: np.ndarray | None = None,
    *,
    min_valid_pixels: int = 20,
) -> Cleaned:
    """Keep the usable pixels, sorted by wavelength, so that later steps can assume clean monotone input.

    - ``mask`` is True (non-zero) for BAD pixels, as in SDSS/astropy masked arrays; those pixels are dropped.
    - Pixels with a non-finite wavelength, flux or error, or a negative error, are dropped.
    - Pixels are sorted by wavelength; pixels sharing a wavelength are merged into one whose flux is their mean and
      whose error is that of the mean (sqrt(sum sigma^2) / n).
    """
    w = _as_1d("wavelength", wavelength)
    f = _as_1d("flux", flux)
    e = None if flux_err is None else _as_1d("flux_err", flux_err)
    m = None if mask is None else _as_1d("mask", mask, dtype=bool)
    _check_lengths(w.shape[0], flux=f, flux_err=e, mask=m)

    good = np.isfinite(w) & np.isfinite(f)
    if e is not None:
        good &= np.isfinite(e) & (e >= 0)
    if m is not None:
        good &= ~m
    with np.errstate(invalid="ignore"):
        non_positive = np.any(w <= 0)  # even on masked pixels: NaN, not 0, marks a missing wavelength
    if non_positive:
        raise NonPositiveWavelengthError("wavelengths must be strictly positive", field="wavelength")
    n_dropped = int(w.size - np.count_nonzero(good))
    w, f = w[good], f[good]
    e = None if e is None else e[good]
    if w.size < min_valid_pixels:
        raise TooFewPixelsError(f"{w.size} usable pixels, need at least {min_valid_pixels}", field="flux")

    if w.size > 1 and not np.all(w[1:] > w[:-1]):
        order = np.argsort(w, kind="stable")
        w, f = w[order], f[order]
        e = None if e is None else e[order]
        starts = np.flatnonzero(_prepend(True, w[1:] != w[:-1]))
        if starts.size < w.size:  # duplicates: merge runs of equal wavelength
            counts = np.diff(_append(starts, w.size))
            w = w[starts]
            f = np.add.reduceat(f, starts) / counts
            e = None if e is None else np.sqrt(np.add.reduceat(e**2, starts)) / counts
            if w.size < min_valid_pixels:
                raise TooFewPixelsError(f"{w.size} distinct wavelengths, need at least {min_valid_pixels}",
                                        field="flux")
    return Cleaned(w, f, e, n_dropped)


# ---------------------------------------------------------------------------------------------------------- rebin


def _prepend(value: float | bool, a: np.ndarray) -> np.ndarray:
    return np.concatenate((np.asarray([value], dtype=a.dtype), a))


def _append(a: np.ndarray, value: float | int) -> np.ndarray:
    return np.concatenate((a, np.asarray([value], dtype=a.dtype)))


def _pixel_bounds(wavelength: FloatArray, gap_factor: float | None) -> tuple[FloatArray, FloatArray]:
    """Left and right edges of each input pixel: midpoints between neighbours, except across gaps.

    A spacing more than ``gap_factor`` times both neighbouring spacings is a gap (a masked region, a chip gap):
    pixels next to it extend by half their other spacing instead of half-way across, so the gap stays uncovered
    rather than being filled by the neighbouring pixels.
    """
    d = np.diff(wavelength)  # [n-1], > 0
    half_left = np.concatenate((d[:1], d)) / 2  # pixel i reaches half-way to pixel i-1 (pixel 0: mirror)
    half_right = np.concatenate((d, d[-1:])) / 2
    if gap_factor is None or d.size < 2:
        return wavelength - half_left, wavelength + half_right
    ref = np.maximum(_prepend(0.0, d[:-1]), _append(d[1:], 0.0))
    gap = d > gap_factor * ref  # [n-1]
    if not np.any(gap):
        return wavelength - half_left, wavelength + half_right
    usable = np.where(gap, np.inf, d)
    own = np.minimum(_prepend(np.inf, usable), _append(usable, np.inf))  # [n] smallest non-gap spacing per pixel
    own = np.where(np.isfinite(own), own, float(np.median(d[~gap])) if np.any(~gap) else float(np.median(d)))
    half_left = _prepend(own[0], np.where(gap, np.minimum(own[1:], d), d)) / 2  # spacing d[i-1] for pixel i
    half_right = _append(np.where(gap, np.minimum(own[:-1], d), d), own[-1]) / 2  # spacing d[i] for pixel i
    return wavelength - half_left, wavelength + half_right


def rebin(
    wavelength: FloatArray,
    flux: FloatArray,
    edges: FloatArray,
    flux_err: FloatArray | None = None,
    *,
    min_fraction: float = 0.99,
    gap_factor: float | None = 3.0,
) -> Rebinned:
    """Flux-conserving rebinning onto the bins between ``edges`` (as SpectRes / specutils FluxConservingResampler).

    Input pixels are bins with edges half-way to their neighbours (see ``_pixel_bounds`` for gaps). Each output
    value is the mean flux density over the covered part of the output bin (overlap-weighted mean of the pixels), so
    the integral of flux over any fully covered range is preserved. Errors of independent pixels propagate exactly:
    sigma_out = sqrt(sum (overlap_j sigma_j)^2) / covered width.

    A bin counts as covered when at least ``min_fraction`` (default 99%) of its width lies under input pixels.
    Bins that are not covered get flux 0 and error 0; nothing is ever extrapolated.
    ``wavelength`` must be strictly increasing (``clean`` guarantees it).
    """
    w = np.asarray(wavelength, dtype=np.float64)
    f = np.asarray(flux, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if not 0 < min_fraction <= 1:
        raise PreprocessError(f"min_fraction must lie in (0, 1], got {min_fraction!r}", field="min_fraction")
    _check_lengths(w.size, flux=f, flux_err=None if flux_err is None else np.asarray(flux_err))
    if w.size < 2:
        raise TooFewPixelsError("rebinning needs at least two input pixels", field="flux")
    if not np.all(w[1:] > w[:-1]):
        raise PreprocessError("wavelengths must be strictly increasing; run clean() first", field="wavelength")
    if e.ndim != 1 or e.size < 2 or not np.all(e[1:] > e[:-1]):
        raise PreprocessError("edges must be strictly increasing with at least two values", field="edges")

    left, right = _pixel_bounds(w, gap_factor)
    width = right - left  # [n]
    lo_edge, hi_edge = e[:-1], e[1:]  # [n_out]
    j_lo = np.searchsorted(right, lo_edge, side="right")  # first pixel reaching into each bin
    j_hi = np.searchsorted(left, hi_edge, side="left") - 1  # last pixel starting inside each bin
    has = j_lo <= j_hi  # False outside the input and inside gaps
    jl, jh = np.minimum(j_lo, w.size - 1), np.maximum(j_hi, 0)  # safe indices; masked by `has`
    ov_lo = np.minimum(right[jl], hi_edge) - np.maximum(left[jl], lo_edge)
    ov_hi = np.minimum(right[jh], hi_edge) - np.maximum(left[jh], lo_edge)
    two_ends = j_hi > j_lo
    inner_from = np.minimum(jl + 1, jh)

    def overlap_sum(values: FloatArray, power: int) -> FloatArray:
        """sum_j values_j * overlap_ij**power per bin: whole pixels from a cumulative sum, the two ends exactly.

        Summing locally (rather than differencing one running integral at the edges) keeps narrow bins accurate.
        """
        cum = _prepend(0.0, np.cumsum(values * width**power))
        inner = np.where(j_hi > j_lo + 1, cum[jh] - cum[inner_from], 0.0)
        ends = values[jl] * ov_lo**power + np.where(two_ends, values[jh] * ov_hi**power, 0.0)
        return np.where(has, inner + ends, 0.0)

    covered = overlap_sum(np.ones_like(w), 1)  # [n_out] width of each bin under input pixels
    coverage = covered >= min_fraction * np.diff(e)
    out = np.zeros(e.size - 1)
    out[coverage] = overlap_sum(f, 1)[coverage] / covered[coverage]
    out_err = None
    if flux_err is not None:
        variance = overlap_sum(np.asarray(flux_err, dtype=np.float64) ** 2, 2)
        out_err = np.zeros(e.size - 1)
        out_err[coverage] = np.sqrt(np.maximum(variance[coverage], 0.0)) / covered[coverage]
    return Rebinned(out, out_err, coverage)


# ------------------------------------------------------------------------------------------------- normalisation


def normalise_robust(flux: FloatArray, coverage: np.ndarray) -> FloatArray:
    """Divide by the median absolute flux of the covered bins, so the result is O(1) whatever the units.

    Falls back to the mean absolute flux when more than half the covered bins are zero; raises when all are.
    Bins outside coverage are 0.
    """
    f = np.asarray(flux, dtype=np.float64)
    cov = np.asarray(coverage, dtype=bool)
    values = np.abs(f[cov])
    if values.size == 0:
        raise NoOverlapError("no covered bins to normalise", field="wavelength")
    scale = float(np.median(values))
    if not scale > 0:
        scale = float(np.mean(values))
    if not (scale > 0 and math.isfinite(scale)):
        raise PreprocessError("all covered flux is zero (or not finite); nothing to normalise", field="flux")
    return np.where(cov, f / scale, 0.0)


def _chunk_bounds(size: int, n_chunks: int) -> np.ndarray:
    """Start indices of ``n_chunks`` near-equal consecutive chunks of ``size`` items, plus ``size``."""
    return (np.arange(n_chunks + 1) * size) // n_chunks


def _chunk_medians(values: FloatArray, n_chunks: int) -> FloatArray:
    """Medians of ``n_chunks`` consecutive near-equal chunks of ``values``, without a Python loop."""
    bounds = _chunk_bounds(values.size, n_chunks)
    lengths = np.diff(bounds)  # all >= 1 because n_chunks <= values.size
    cols = np.arange(int(lengths.max()))
    table = values[np.minimum(bounds[:-1, None] + cols[None, :], values.size - 1)]  # [n_chunks, width]
    table[cols[None, :] >= lengths[:, None]] = np.inf  # padding sorts last
    table.sort(axis=1)
    rows = np.arange(n_chunks)
    medians: FloatArray = (table[rows, (lengths - 1) // 2] + table[rows, lengths // 2]) / 2
    return medians


def _natural_cubic_spline(x: FloatArray, y: FloatArray, x_eval: FloatArray) -> FloatArray:
    """Natural cubic spline through (x, y), linear beyond the end knots (second derivative is zero there)."""
    n = x.size
    if n == 1:
        return np.full(x_eval.shape, y[0])
    h = np.diff(x)
    slope = np.diff(y) / h
    m = np.zeros(n)  # second derivatives; natural ends
    if n > 2:
        a = np.diag(2 * (h[:-1] + h[1:])) + np.diag(h[1:-1], 1) + np.diag(h[1:-1], -1)
        m[1:-1] = np.linalg.solve(a, 6 * np.diff(slope))
    # one polynomial per piece: [left extrapolation, n-1 cubic intervals, right extrapolation]
    d_start = slope[0] - h[0] * (2 * m[0] + m[1]) / 6
    d_end = slope[-1] + h[-1] * (m[-2] + 2 * m[-1]) / 6
    base = np.concatenate((x[:1], x))  # [n+1] where t = x_eval - base starts
    c0 = np.concatenate((y[:1], y[:-1], y[-1:]))
    c1 = np.concatenate(([d_start], slope - h * (2 * m[:-1] + m[1:]) / 6, [d_end]))
    c2 = np.concatenate(([0.0], m[:-1] / 2, [0.0]))
    c3 = np.concatenate(([0.0], (m[1:] - m[:-1]) / (6 * h), [0.0]))
    k = np.searchsorted(x, x_eval, side="right")  # 0: left of the knots, n: right of them
    t = x_eval - base[k]
    values: FloatArray = c0[k] + t * (c1[k] + t * (c2[k] + t * c3[k]))
    return values


def _log_continuum(flux: FloatArray, idx: np.ndarray, knots: int) -> tuple[FloatArray, FloatArray]:
    """Spline knots (log flux, position) from the medians of ``knots`` near-equal chunks of ``flux[idx]``."""
    n_knots = min(knots, idx.size)
    knot_flux = _chunk_medians(flux[idx], n_knots)
    bounds = _chunk_bounds(idx.size, n_knots)  # idx is sorted: its chunk medians are the middle elements
    knot_pos = (idx[(bounds[:-1] + bounds[1:] - 1) // 2] + idx[(bounds[:-1] + bounds[1:]) // 2]) / 2
    top = float(knot_flux.max())
    if not (top > 0 and math.isfinite(top)):
        raise PreprocessError("the continuum is not positive anywhere; cannot divide by it", field="flux")
    return np.log(np.maximum(knot_flux, 1e-3 * top)), knot_pos


def remove_continuum(flux: FloatArray, coverage: np.ndarray, knots: int = 13, *, apodise: float = 0.05,
                     clip: float = 3.0) -> FloatArray:
    """SNID-style continuum removal: flux / continuum - 1, cosine-tapered to 0 at the covered edges.

    The continuum is a natural cubic spline in log flux through the medians of ``knots`` equal chunks of the covered
    bins (medians ignore narrow lines; working in log keeps the continuum positive). It is refitted twice, each time
    leaving out bins whose residual lies more than ``clip`` robust sigmas (and 2%) from the median, so that a strong
    line does not drag its knot up. Knot medians below 1e-3 of the largest are floored there so that noise
    near zero flux cannot blow up the division. The first and last ``apodise`` fraction of the covered range is
    multiplied by a cosine bell. Bins outside coverage are 0.
    """
    f = np.asarray(flux, dtype=np.float64)
    cov = np.asarray(coverage, dtype=bool)
    idx = np.flatnonzero(cov)
    if idx.size == 0:
        raise NoOverlapError("no covered bins to fit a continuum to", field="wavelength")
    x = idx.astype(np.float64)
    knot_y, knot_x = _log_continuum(f, idx, knots)
    for _ in range(_CLIP_PASSES):
        resid = f[idx] / np.exp(_natural_cubic_spline(knot_x, knot_y, x)) - 1.0
        centre = np.median(resid)
        sigma = 1.4826 * np.median(np.abs(resid - centre))
        keep = np.abs(resid - centre) <= max(clip * sigma, _MIN_CLIP)
        if np.count_nonzero(keep) < max(knots, idx.size // 2):
            break
        knot_y, knot_x = _log_continuum(f, idx[keep], knots)
    out = np.zeros_like(f)
    out[idx] = f[idx] / np.exp(_natural_cubic_spline(knot_x, knot_y, x)) - 1.0

    span = idx[-1] - idx[0] + 1
    n_taper = max(1, int(round(apodise * span)))
    if apodise > 0 and 2 * n_taper <= span:
        ramp = 0.5 * (1.0 - np.cos(np.pi * (np.arange(n_taper) + 0.5) / n_taper))
        out[idx[0]: idx[0] + n_taper] *= ramp
        out[idx[-1] - n_taper + 1: idx[-1] + 1] *= ramp[::-1]
    return out


# ----------------------------------------------------------------------------------------------------------- S/N


def der_snr(flux: FloatArray) -> float:
    """DER_SNR (Stoehr et al. 2008): median flux over a noise estimate from second differences 2 pixels apart.

    Zero and non-finite pixels are ignored, as in the reference code; nan when fewer than 5 pixels remain or the
    noise estimate is zero (a noiseless spectrum has no finite S/N).
    """
    f = np.asarray(flux, dtype=np.float64)
    f = f[np.isfinite(f) & (f != 0)]
    if f.size < 5:
        return math.nan
    signal = float(np.median(f))
    noise = 1.482602 / math.sqrt(6.0) * float(np.median(np.abs(2.0 * f[2:-2] - f[:-4] - f[4:])))
    return signal / noise if noise > 0 else math.nan


def median_snr(flux: FloatArray, flux_err: FloatArray | None = None) -> float:
    """Median per-pixel flux / error over pixels with a positive finite error; DER_SNR when there are no errors."""
    if flux_err is None:
        return der_snr(flux)
    f = np.asarray(flux, dtype=np.float64)
    e = np.asarray(flux_err, dtype=np.float64)
    ok = np.isfinite(f) & np.isfinite(e) & (e > 0)
    return float(np.median(f[ok] / e[ok])) if np.any(ok) else math.nan


# --------------------------------------------------------------------------------------------------------- prepare


def prepare(
    wavelength: FloatArray,
    flux: FloatArray,
    *,
    flux_err: FloatArray | None = None,
    mask: np.ndarray | None = None,
    wavelength_unit: str = "Angstrom",
    flux_unit: str = "erg / (s cm2 Angstrom)",
    medium: Medium = "air",
    frame: Frame = "observed",
    redshift: float | None = None,
    flux_calibrated: bool = True,
    config: PreprocessConfig = PreprocessConfig(),
) -> Prepared:
    """One spectrum's arrays and metadata to the model input on ``config.grid``.

    The model reads observer-frame spectra: a ``frame="rest"`` spectrum is moved to the observer frame with
    ``redshift`` (required then). This is the one home of that rule for packets, files and evaluation.
    Raises a ``PreprocessError`` subclass naming the offending field when the spectrum cannot be used.
    """
    if frame not in ("observed", "rest"):
        raise PreprocessError(f"frame must be 'observed' or 'rest', got {frame!r}", field="wavelength_frame")
    if frame == "rest" and redshift is None:
        raise PreprocessError("a rest-frame spectrum needs a redshift to be placed in the observer frame",
                              field="redshift")
    if medium not in ("air", "vacuum"):
        raise PreprocessError(f"medium must be 'air' or 'vacuum', got {medium!r}", field="medium")
    if redshift is not None and not (math.isfinite(redshift) and redshift > -1.0):
        raise PreprocessError(f"redshift must be finite and > -1, got {redshift!r}", field="redshift")
    w = _as_1d("wavelength", wavelength)
    f = _as_1d("flux", flux)
    e = None if flux_err is None else _as_1d("flux_err", flux_err)
    m = None if mask is None else _as_1d("mask", mask, dtype=bool)
    _check_lengths(w.shape[0], flux=f, flux_err=e, mask=m)  # before unit conversion broadcasts anything
    flags: list[str] = []

    # units: Angstrom and F_lambda
    w = to_angstrom(w, wavelength_unit)
    if frame == "rest":
        w = w * (1.0 + float(redshift))  # type: ignore[arg-type]  # checked above
    f_fl = to_flambda(f, flux_unit, w)
    e_fl = None if e is None else units.flambda_err(e, f_fl, flux_unit, w)
    if e is None:
        flags.append("no_flux_err")
    if not flux_calibrated or not units.flux_unit(flux_unit).calibrated:
        flags.append("uncalibrated")

    # clean, then vacuum rest-frame wavelengths
    cleaned = clean(w, f_fl, e_fl, m, min_valid_pixels=config.min_valid_pixels)
    if cleaned.n_dropped:
        flags.append("dropped_pixels")
    w = air_to_vacuum(cleaned.wavelength) if medium == "air" else cleaned.wavelength
    if config.to_rest_frame:
        if redshift is None:
            flags.append("no_redshift")
        else:
            w = rest_frame(w, redshift)

    # rebin onto the grid
    grid = config.grid
    if w[-1] <= grid.wave_min or w[0] >= grid.wave_max:
        raise NoOverlapError(f"spectrum spans {w[0]:.1f}-{w[-1]:.1f} A, grid spans "
                             f"{grid.wave_min:.1f}-{grid.wave_max:.1f} A", field="wavelength")
    binned = rebin(w, cleaned.flux, grid.edges())
    n_covered = int(np.count_nonzero(binned.coverage))
    if n_covered == 0:
        raise NoOverlapError("spectrum covers no complete grid bin", field="wavelength")
    coverage_fraction = n_covered / grid.n_bins
    if coverage_fraction < config.min_coverage:
        raise TooFewPixelsError(f"spectrum covers {coverage_fraction:.1%} of the grid, need "
                                f"{config.min_coverage:.1%}", field="wavelength")
    if n_covered < grid.n_bins:
        flags.append("partial_coverage")
    covered_idx = np.flatnonzero(binned.coverage)
    if covered_idx[-1] - covered_idx[0] + 1 != n_covered:
        flags.append("coverage_gaps")
    if np.count_nonzero(binned.flux[binned.coverage] < 0) > _NEGATIVE_FLUX_FRACTION * n_covered:
        flags.append("negative_flux")

    # normalise
    if config.normalisation == "continuum":
        normalised = remove_continuum(binned.flux, binned.coverage, config.continuum_knots)
    else:
        normalised = normalise_robust(binned.flux, binned.coverage)

    # S/N of the input pixels that land on the grid (rebinning would correlate the noise)
    on_grid = (w >= grid.wave_min) & (w <= grid.wave_max)
    snr = median_snr(cleaned.flux[on_grid], None if cleaned.flux_err is None else cleaned.flux_err[on_grid])

    if not np.all(np.isfinite(normalised)):
        raise PreprocessError("normalisation produced non-finite values", field="flux")
    if np.any(np.abs(normalised) > NORMALISED_LIMIT):
        flags.append("clipped")
        normalised = np.clip(normalised, -NORMALISED_LIMIT, NORMALISED_LIMIT)
    out_flux = normalised.astype(np.float32)
    out_flux.setflags(write=False)
    coverage = binned.coverage.copy()
    coverage.setflags(write=False)
    return Prepared(flux=out_flux, coverage=coverage, coverage_fraction=coverage_fraction, median_snr=snr,
                    flags=tuple(flags))
