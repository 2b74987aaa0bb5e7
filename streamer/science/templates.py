"""Redshift refined by templates: SNID-style cross-correlation around the network's redshift (pure numpy).

The network's redshift is a prior; the refinement looks for a better one within ``window`` of it in ln(1 + z) by
cross-correlating the spectrum with a bank of supernova templates (SNID, Blondin & Tonry 2007). Both sides are
continuum-removed and apodised on log-uniform grids of the same step (the model input, ``Prepared.flux``, already
is: ``normalisation: continuum``), so a redshift is a shift: observed bin ``j`` at integer shift ``s`` lies on
template (rest-frame) bin ``j + offset - s`` and z = exp(s * dln) - 1.

It runs in two stages, both matrix products of the shifted input against the bank over the window's integer shifts
(plus one on each side for the peak fit); the products were measured ~30x faster than FFT cross-correlations for
a window of ~20 shifts (``bench/bench_refine.py``):

1. a screen of every allowed template with one product, ``sum(x t) / |t|`` (the correlation up to the input's own
   norm) at every other shift; up to 16 spectra are stacked into one product so that the bank is read once per
   stack (alone the product is memory-bound: 0.46 -> 0.09 ms per spectrum);
2. the exact Pearson correlation over the bins both spectra cover (``Prepared.coverage`` and the template's range)
   of the ``n_candidates`` best, at every shift. Each candidate's peak is its highest local maximum strictly inside
   the window with enough overlap, at sub-bin precision from a parabola through it and its two neighbours. Like
   SNID, the refined z is the median over the good matches: the peaks of up to 15 best templates whose correlation
   is within 0.1 of the best one's (measured: NMAD 0.0056 -> 0.0048 against the single best template); the best
   template is the one reported.

Quality and error follow SNID (Tonry & Davis 1979; Blondin & Tonry 2007), on the best template's Pearson correlation
``c(d)`` over lags ``d`` = -``_WIDE``..``_WIDE`` bins around the peak:

- ``r = h / (sqrt(2) * sigma_a)``: peak height ``h`` over the rms ``sigma_a`` of the antisymmetric part
  ``a(d) = (c(d) - c(-d)) / 2`` (a perfect, symmetric match has a tall peak and sigma_a -> 0);
- ``lap``: the overlap of input and template in ln(wavelength) at the peak (at most ln(10000/3500) = 1.05 here);
- ``rlap = r * lap``; the refined z is used (method ``"template"``) when ``rlap >= min_rlap`` and the Pearson
  correlation at the peak ``corr >= min_corr``, otherwise the prior is kept (method ``"network"``);
- ``z_err = (1 + z) * sqrt((k * w / (1 + r * lap))**2 + floor**2 + (a * spread)**2)``: SNID's ``k w / (1 + r lap)``
  with ``w`` the full width at half maximum of ``c`` around the peak in ln(1 + z), a floor for the mismatch between
  any template and the object (velocities, host lines), and the scatter (1.4826 MAD) of the good matches' ln(1 + z).
  ``k``, ``floor`` and ``a`` were fitted on real spectra so that the NMAD of (z - z_true) / z_err is ~1 across
  quartiles of rlap and of the scatter (without the scatter term it ranged 0.74-1.43; with it 0.79-1.21).

Measured on ~1,100 real WISeREP/OSC spectra with a bank that excludes their objects (``bench/bench_refine.py``):
below rlap 3 the template's z is no better than a prior off by 0.02 in ln(1 + z); above it, its NMAD is 0.003-0.005.
``corr >= 0.4`` rejects white noise (which reaches rlap 3 in a third of trials) at the cost of 2.5% of real matches.

Window and threshold (spectranet-sedm 0.4.0's z as the prior, its 1,935 real-degraded validation spectra, bank without
their objects; NMAD of dz/(1+z), outliers abs(dz) > 0.15, share refined):

| window | min_rlap | NMAD | outliers | refined |
|---|---|---|---|---|
| 0.03 | 3 | 0.0138 | 6.0% | 60% |
| 0.05 | 3 | 0.0106 | 5.9% | 64% |
| **0.06** | **2** | **0.0081** | **5.7%** | **78%** |
| 0.08 | 2 | 0.0079 | 5.9% | 80% |
| 0.10 | 2 | 0.0078 | 6.3% | 82% |
| 0.08 | 1.5 | 0.0075 | 5.9% | 85% |

The network's z alone: NMAD 0.028, so a 0.03 window left the true z outside for a third of the
spectra; between rlap 2 and 3 the template's z (NMAD 0.024) still beats the network's (0.051), below 2 it does not.
A window that widens with the network's own uncertainty (3 sigma, 0.05-0.35) raised the outliers to 7-10% (wrong
templates far from the prior): not used. On the simulated validation set the same choice gives NMAD 0.0051 (0.0058
before), outliers 1.4%.

The bank stores its templates sorted by taxonomy class so that restricting a spectrum to some classes (for example
the network's top two) multiplies against contiguous blocks, without copies. The products are small: run with one
BLAS thread (``OPENBLAS_NUM_THREADS=1`` / ``OMP_NUM_THREADS=1``); a second BLAS thread spins (measured: it more
than doubled the CPU time).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from spectranet.streamer.errors import CheckpointError, ConfigError
from spectranet.streamer.science.preprocess import Grid
from spectranet.streamer.science.taxonomy import CLASSES

__all__ = [
    "BANK_FORMAT_VERSION",
    "DEFAULT_WINDOW",
    "RefineConfig",
    "METHOD_TEMPLATE",
    "METHOD_NETWORK",
    "TemplateBank",
    "TemplateMatch",
    "Refinement",
    "load_template_bank",
    "save_template_bank",
    "default_template_bank_path",
    "refine_redshift",
]

BANK_FORMAT_VERSION = 1
DEFAULT_WINDOW = 0.06  # half-width of the search in ln(1 + z) around the prior (measured: module docstring)

METHOD_TEMPLATE = "template"
METHOD_NETWORK = "network"

_MIN_BINS = 20  # fewer covered input bins than this: not refined
_N_CONSENSUS = 15  # the z is the median of the peaks of at most this many best templates ...
_CONSENSUS_DROP = 0.1  # ... whose peak correlation is within this of the best one's
_GROUP = 16  # spectra screened by one product (measured: 0.46 -> 0.09 ms per spectrum from 1 to 16)
_SCREEN_STRIDE = 2  # the screen looks at every other shift (the peaks are ~7 bins wide; measured: no loss)
_WIDE = 24  # lags either side of the peak for r and the peak width
_R_MAX = 99.0  # r is capped (a noiseless self-match has sigma_a ~ 0)
_GRID_TOL = 1e-6  # relative tolerance when checking that the bank's step and alignment fit the input grid
_BANK_ARRAYS = ("flux", "start", "stop", "phases", "objects", "types", "classes", "sources", "grid", "meta")


# ---------------------------------------------------------------------------------------------------------- bank


@dataclass(frozen=True)
class TemplateMatch:
    """The best-matching template of one spectrum: "looks like SN 2011fe at +5 d"."""

    object: str  # as the template file names it, e.g. "sn2011fe"
    type: str  # as the template reports it, e.g. "Ia-norm"
    phase: float  # days from maximum light; nan when the template does not say
    r: float  # SNID r-value of the correlation peak (height over antisymmetric noise)
    rlap: float  # r * lap, the quality that decided the method


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields have no single truth value
class TemplateBank:
    """Rest-frame templates on a log-uniform grid, continuum-removed and apodised, sorted by taxonomy class.

    ``flux`` is 0 outside ``[start, stop)``; ``classes`` is non-decreasing in taxonomy order so that each class is
    one contiguous block of rows. ``sha256`` is the hash of the file the bank was loaded from ("" when built in
    memory).
    """

    grid: Grid  # rest frame, vacuum Angstrom
    flux: np.ndarray  # float32 [N, L]
    start: np.ndarray  # int64 [N], first covered bin
    stop: np.ndarray  # int64 [N], one past the last covered bin
    objects: tuple[str, ...]
    types: tuple[str, ...]
    classes: tuple[str, ...]
    phases: np.ndarray  # float64 [N], days from maximum; nan when unknown
    sources: tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)  # version, builder settings, credits
    sha256: str = ""
    _cache: dict[tuple[float, float, int], _Work] = field(default_factory=dict, repr=False, compare=False)  # by grid

    def __post_init__(self) -> None:
        n, length = self.flux.shape if self.flux.ndim == 2 else (-1, -1)
        if n < 1 or length != self.grid.n_bins:
            raise ConfigError(f"template flux must be [N >= 1, {self.grid.n_bins}], got {self.flux.shape}")
        for name in ("objects", "types", "classes", "sources"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"template bank: {name} has {len(getattr(self, name))} entries for {n} templates")
        for name in ("start", "stop", "phases"):
            if getattr(self, name).shape != (n,):
                raise ConfigError(f"template bank: {name} must have shape ({n},)")
        unknown = set(self.classes) - set(CLASSES)
        if unknown:
            raise ConfigError(f"template bank: classes {sorted(unknown)} are not in the taxonomy")
        order = [CLASSES.index(c) for c in self.classes]
        if any(b < a for a, b in zip(order, order[1:])):
            raise ConfigError("template bank: templates must be sorted by taxonomy class")
        if np.any(self.start < 0) or np.any(self.stop > length) or np.any(self.stop - self.start < _MIN_BINS):
            raise ConfigError(f"template bank: every template must cover at least {_MIN_BINS} bins of its grid")

    def __len__(self) -> int:
        return int(self.flux.shape[0])

    @property
    def version(self) -> str:
        return str(self.meta.get("version", ""))

    def check_grid(self, grid: Grid) -> None:
        """Raise ``ConfigError`` unless the bank can refine inputs on ``grid`` (same log step, aligned bin edges);
        also lays out the arrays the refinement multiplies against, once."""
        _work(self, grid)

    def class_blocks(self) -> dict[str, slice]:
        """Rows of each class present in the bank, as contiguous slices."""
        blocks: dict[str, slice] = {}
        for c in CLASSES:
            idx = [i for i, k in enumerate(self.classes) if k == c]
            if idx:
                blocks[c] = slice(idx[0], idx[-1] + 1)
        return blocks

    def match(self, index: int, *, r: float, rlap: float) -> TemplateMatch:
        return TemplateMatch(object=self.objects[index], type=self.types[index], phase=float(self.phases[index]),
                             r=float(r), rlap=float(rlap))

    def subset(self, keep: np.ndarray) -> TemplateBank:
        """The templates where ``keep`` (bool [N]) is True (order kept, so still sorted by class)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self),) or not keep.any():
            raise ConfigError(f"subset needs a bool mask of shape ({len(self)},) selecting at least one template")
        idx = np.flatnonzero(keep)

        def pick(xs: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(xs[i] for i in idx)

        return TemplateBank(grid=self.grid, flux=self.flux[idx], start=self.start[idx], stop=self.stop[idx],
                            objects=pick(self.objects), types=pick(self.types), classes=pick(self.classes),
                            phases=self.phases[idx], sources=pick(self.sources), meta=dict(self.meta))


def save_template_bank(bank: TemplateBank, path: str | Path) -> str:
    """Write ``bank`` as a compressed .npz (flux as float16, no pickles); returns the file's SHA-256."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf, flux=bank.flux.astype(np.float16), start=bank.start.astype(np.int32), stop=bank.stop.astype(np.int32),
        phases=bank.phases.astype(np.float64), objects=np.array(bank.objects, dtype=str),
        types=np.array(bank.types, dtype=str), classes=np.array(bank.classes, dtype=str),
        sources=np.array(bank.sources, dtype=str), grid=np.array(json.dumps(bank.grid.to_dict())),
        meta=np.array(json.dumps({**bank.meta, "format_version": BANK_FORMAT_VERSION}, sort_keys=True)),
    )
    data = buf.getvalue()
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_template_bank(path: str | Path, *, expected_sha256: str | None = None) -> TemplateBank:
    """Read a bank written by ``save_template_bank``; raises ``CheckpointError`` when the file is missing, corrupt,
    of another format version, or (when given) its SHA-256 differs from ``expected_sha256``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"template bank {path} cannot be read: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise CheckpointError(f"template bank {path} has SHA-256 {digest}, expected {expected_sha256}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            missing = set(_BANK_ARRAYS) - set(z.files)
            if missing:
                raise CheckpointError(f"template bank {path} lacks arrays {sorted(missing)}")
            meta = json.loads(str(z["meta"]))
            if meta.get("format_version") != BANK_FORMAT_VERSION:
                raise CheckpointError(f"template bank {path} has format version {meta.get('format_version')!r}, "
                                      f"this code reads {BANK_FORMAT_VERSION}")
            return TemplateBank(
                grid=Grid.from_dict(json.loads(str(z["grid"]))), flux=z["flux"].astype(np.float32),
                start=z["start"].astype(np.int64), stop=z["stop"].astype(np.int64),
                objects=tuple(z["objects"].tolist()), types=tuple(z["types"].tolist()),
                classes=tuple(z["classes"].tolist()), phases=z["phases"].astype(np.float64),
                sources=tuple(z["sources"].tolist()), meta=meta, sha256=digest,
            )
    except (ValueError, KeyError, OSError, json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"template bank {path} is not a valid bank: {exc}") from exc


def default_template_bank_path(folder: str | Path | None = None) -> Path:
    """The template bank shipped in ``streamer/models/templates/`` (the newest by file name when several)."""
    folder = Path(str(resources.files("spectranet.streamer") / "models" / "templates")) if folder is None \
        else Path(folder)
    found = sorted(folder.glob("*.npz"))
    if not found:
        raise CheckpointError(f"no template bank (*.npz) in {folder}")
    return found[-1]


# ------------------------------------------------------------------------------------------------------- refine


@dataclass(frozen=True)
class RefineConfig:
    """How ``refine_redshift`` decides and what it reports; the defaults were measured (module docstring)."""

    min_rlap: float = 2.0  # quality threshold on r * lap (SNID's own default is 5, on its own r scale)
    min_corr: float = 0.4  # ... and on the Pearson correlation at the peak
    z_err_scale: float = 0.4  # k in SNID's k w / (1 + r lap) (Tonry & Davis' 3/8 = 0.375)
    z_err_floor: float = 0.00225  # in ln(1 + z), added in quadrature
    z_err_spread: float = 0.8  # a: weight of the good matches' scatter, added in quadrature
    min_overlap: float = 0.5  # a (template, shift) pair counts when it overlaps this fraction of the input's coverage
    n_candidates: int = 32  # templates kept from the screen for the exact correlation
    interpolate: bool = True  # sub-bin peak by a parabola (False: the integer shift; for diagnostics)

    def __post_init__(self) -> None:
        if not (0.0 < self.min_overlap <= 1.0):
            raise ConfigError(f"min_overlap must lie in (0, 1], got {self.min_overlap!r}")
        if not (isinstance(self.n_candidates, int) and self.n_candidates >= 1):
            raise ConfigError(f"n_candidates must be an integer >= 1, got {self.n_candidates!r}")
        if min(self.z_err_scale, self.z_err_floor, self.z_err_spread) < 0:
            raise ConfigError("z_err_scale, z_err_floor and z_err_spread must be >= 0")



@dataclass(frozen=True, eq=False)
class Refinement:
    """Per-spectrum results of ``refine_redshift``, arrays of length B."""

    z: np.ndarray  # float64: refined z where method is "template", else the prior
    z_err: np.ndarray  # float64: template z error where method is "template", else nan (the caller keeps its own)
    z_template: np.ndarray  # float64: the templates' z whatever the method (nan when no peak was found)
    r: np.ndarray  # float64: SNID r-value of the best peak (0 when none)
    lap: np.ndarray  # float64: overlap in ln(wavelength) at the best peak
    rlap: np.ndarray  # float64: r * lap
    corr: np.ndarray  # float64: Pearson correlation at the best peak
    template: np.ndarray  # int64: index of the best template in the bank, -1 when none
    method: np.ndarray  # str: "template" or "network"
    spread: np.ndarray  # float64: scatter of the good matches' ln(1 + z) (nan when no peak)
    n_good: np.ndarray  # int64: templates in the median (0 when no peak)

    def __len__(self) -> int:
        return int(self.z.shape[0])

    def match(self, i: int, bank: TemplateBank) -> TemplateMatch | None:
        """The best template of spectrum ``i`` when the refinement was used, else None."""
        if self.method[i] != METHOD_TEMPLATE:
            return None
        return bank.match(int(self.template[i]), r=float(self.r[i]), rlap=float(self.rlap[i]))


@dataclass(frozen=True, eq=False)
class _Work:
    """The bank laid out for the products (float32, C order; ``t.T`` is the [L, N] operand of the screen)."""

    t: np.ndarray  # [N, L] template flux
    start: np.ndarray  # [N] first covered bin
    stop: np.ndarray  # [N] one past the last
    norm: np.ndarray  # [N] sqrt(sum t^2)
    offset: int  # template bin under input bin 0 at shift 0
    dln: float
    blocks: dict[str, slice]

    @property
    def n_rows(self) -> int:
        return int(self.t.shape[1])

    def columns(self, idx: np.ndarray, rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flux, squared flux and coverage (1/0) of templates ``idx`` over bins ``rows``, each [W, len(idx)]."""
        t = np.ascontiguousarray(self.t[idx, rows].T)
        b = np.arange(rows.start, rows.stop)[:, None]
        m = ((b >= self.start[idx][None, :]) & (b < self.stop[idx][None, :])).astype(np.float32)
        return t, t * t, m


def _work(bank: TemplateBank, grid: Grid) -> _Work:
    key = (float(grid.wave_min), float(grid.wave_max), int(grid.n_bins))
    cached = bank._cache.get(key)
    if cached is not None:
        return cached
    dln = math.log(grid.wave_max / grid.wave_min) / grid.n_bins
    bank_dln = math.log(bank.grid.wave_max / bank.grid.wave_min) / bank.grid.n_bins
    if abs(bank_dln - dln) > _GRID_TOL * dln:
        raise ConfigError(f"template bank step {bank_dln:.8f} in ln(wavelength) differs from the input grid's "
                          f"{dln:.8f}; build the bank for this grid")
    offset_f = math.log(grid.wave_min / bank.grid.wave_min) / dln
    offset = int(round(offset_f))
    if abs(offset_f - offset) > 1e-3:
        raise ConfigError(f"input grid edge {grid.wave_min} A does not fall on a template bank bin edge "
                          f"(offset {offset_f:.4f} bins); build the bank for this grid")
    t = np.ascontiguousarray(bank.flux, dtype=np.float32)
    work = _Work(t=t, start=bank.start.copy(), stop=bank.stop.copy(), norm=np.sqrt(np.maximum((t * t).sum(axis=1),
                 1e-12)), offset=offset, dln=dln, blocks=bank.class_blocks())
    bank._cache[key] = work
    return work


def refine_redshift(
    flux: np.ndarray,
    coverage: np.ndarray,
    z_prior: np.ndarray,
    bank: TemplateBank,
    grid: Grid,
    *,
    window: float = DEFAULT_WINDOW,
    classes: Sequence[Collection[str] | None] | None = None,
    config: RefineConfig = RefineConfig(),
) -> Refinement:
    """Refine ``z_prior`` [B] of continuum-removed spectra ``flux`` [B, n_bins] on ``grid`` (``coverage`` bool
    [B, n_bins]) by cross-correlation with ``bank`` within ``window`` in ln(1 + z).

    ``classes``: per spectrum, the taxonomy classes whose templates may match (None: all), e.g. the network's top two.
    The refined z always lies within ``window`` of the prior. See the module docstring for r, lap and z_err.
    """
    flux = np.asarray(flux, dtype=np.float32)
    cov = np.asarray(coverage, dtype=bool)
    zp = np.asarray(z_prior, dtype=np.float64).reshape(-1)
    b = zp.shape[0]
    if flux.shape != (b, grid.n_bins) or cov.shape != flux.shape:
        raise ConfigError(f"refine_redshift needs flux and coverage of shape ({b}, {grid.n_bins}) for {b} priors, "
                          f"got {flux.shape} and {cov.shape}")
    if not (0.0 < window < 1.0):
        raise ConfigError(f"window must lie in (0, 1) in ln(1 + z), got {window!r}")
    if classes is not None and len(classes) != b:
        raise ConfigError(f"classes must give one entry per spectrum ({b}), got {len(classes)}")
    work = _work(bank, grid)
    out = {k: np.full(b, np.nan) for k in ("z_err", "z_template", "lap", "corr", "spread", "n_good")}
    r = np.zeros(b)
    template = np.full(b, -1, dtype=np.int64)
    plans: list[_Plan | None] = []
    for i in range(b):
        wanted = None if classes is None else classes[i]
        plans.append(_plan(flux[i], cov[i], float(zp[i]), work, window=window,
                           allowed=None if wanted is None else frozenset(wanted)))
    for i, (plan, idx) in enumerate(zip(plans, _candidates(plans, work, config.n_candidates))):
        if plan is None or idx is None:
            continue
        peak = _finish(plan, idx, work, window=window, config=config)
        if peak is None:
            continue
        template[i] = peak.template
        out["z_template"][i], r[i], out["lap"][i], out["corr"][i] = peak.z, peak.r, peak.lap, peak.corr
        out["spread"][i], out["n_good"][i] = peak.spread, peak.n_good
        snid = config.z_err_scale * peak.width / (1.0 + peak.r * peak.lap)
        out["z_err"][i] = (1.0 + peak.z) * math.hypot(snid, config.z_err_floor, config.z_err_spread * peak.spread)
    rlap = np.where(template >= 0, r * np.nan_to_num(out["lap"]), 0.0)
    use = (template >= 0) & (rlap >= config.min_rlap) & (np.nan_to_num(out["corr"], nan=-1.0) >= config.min_corr)
    return Refinement(
        z=np.where(use, out["z_template"], zp), z_err=np.where(use, out["z_err"], np.nan),
        z_template=out["z_template"], r=r, lap=np.nan_to_num(out["lap"]), rlap=rlap, corr=out["corr"],
        template=template, method=np.where(use, METHOD_TEMPLATE, METHOD_NETWORK), spread=out["spread"],
        n_good=np.nan_to_num(out["n_good"]).astype(np.int64),
    )


@dataclass(frozen=True)
class _Peak:
    template: int
    z: float
    r: float
    lap: float
    corr: float
    width: float  # FWHM of the correlation peak in ln(1 + z)
    spread: float  # scatter (1.4826 MAD) of the good matches' ln(1 + z); 0 with one match
    n_good: int  # how many templates made the median


def _pearson(x_rows: np.ndarray, x2_rows: np.ndarray, m_rows: np.ndarray, t: np.ndarray, t2: np.ndarray,
             m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation and overlap (bins) of shifted inputs [S, W] against templates [W, N] -> [S, N] each."""
    sxt = x_rows @ t
    sx = x_rows @ m
    sxx = x2_rows @ m
    st = m_rows @ t
    stt = m_rows @ t2
    n = m_rows @ m
    inv_n = 1.0 / np.maximum(n, 1.0)
    cov = sxt - sx * st * inv_n
    vx = sxx - sx * sx * inv_n
    vt = stt - st * st * inv_n
    denom = vx * vt
    np.maximum(denom, 1e-20, out=denom)
    return cov / np.sqrt(denom), n


def _shifted(v: np.ndarray, n_shift: int, width: int) -> np.ndarray:
    """Rows k = 0..n_shift-1 of length ``width``, with ``v`` starting at column n_shift - 1 - k."""
    pad = np.zeros(v.shape[0] + 2 * (n_shift - 1), dtype=np.float32)
    pad[n_shift - 1: n_shift - 1 + v.shape[0]] = v
    step = pad.strides[0]
    return np.lib.stride_tricks.as_strided(pad, shape=(n_shift, width), strides=(step, step), writeable=False).copy()


@dataclass(frozen=True, eq=False)
class _Plan:
    """One spectrum's search: its shifted copies over the bank bins ``rows`` at shifts ``shifts``."""

    z_prior: float
    n_cov: int
    xm: np.ndarray  # [n_bins] flux, 0 outside coverage
    m: np.ndarray  # [n_bins] coverage as 1/0
    shifts: np.ndarray  # [S] integer shifts, one extra on each side of the window
    inside: np.ndarray  # bool [S], shifts where a peak may sit
    rows: slice  # bank bins under the shifted copies
    xs: np.ndarray  # [S, W] shifted flux (row k: shift shifts[k])
    ms: np.ndarray  # [S, W] shifted coverage
    x2s: np.ndarray  # [S, W] shifted squared flux
    allowed: frozenset[str] | None  # classes whose templates may match (None: all)


def _plan(x: np.ndarray, cov: np.ndarray, z_prior: float, work: _Work, *, window: float,
          allowed: frozenset[str] | None) -> _Plan | None:
    n_cov = int(np.count_nonzero(cov))
    if allowed is not None and not allowed & set(work.blocks):
        return None
    if n_cov < _MIN_BINS or not (math.isfinite(z_prior) and z_prior > -1.0):
        return None
    n_in, n_rows = x.shape[0], work.n_rows
    s_mid = math.log1p(z_prior) / work.dln
    half = window / work.dln
    s_lo, s_hi = math.floor(s_mid - half) - 1, math.ceil(s_mid + half) + 1  # one extra shift each side: peak fit
    n_shift = s_hi - s_lo + 1
    width = n_in + n_shift - 1
    r0 = work.offset - s_hi  # bank bin under input bin 0 at the largest shift
    c0, c1 = max(0, -r0), width - max(0, r0 + width - n_rows)  # columns that exist in the bank
    if c1 - c0 < _MIN_BINS:
        return None
    m = cov.astype(np.float32)
    xm = np.where(cov, x, 0.0).astype(np.float32)
    xs, ms, x2s = (_shifted(v, n_shift, width)[:, c0:c1] for v in (xm, m, xm * xm))
    shifts = s_lo + np.arange(n_shift)
    inside = np.abs(shifts - s_mid) <= half + 0.5  # peaks must sit inside the window (to half a bin)
    inside[0] = inside[-1] = False
    return _Plan(z_prior=z_prior, n_cov=n_cov, xm=xm, m=m, shifts=shifts, inside=inside,
                 rows=slice(r0 + c0, r0 + c1), xs=xs, ms=ms, x2s=x2s, allowed=allowed)


def _screen(plans: Sequence[_Plan], work: _Work, block: slice) -> np.ndarray:
    """sum(x t) / |t| of each plan's spectrum with the templates of ``block``, the best over (every other) shift
    inside its window: [G, n]. Up to the input's own norm (the same for every template) this is the correlation,
    lowered for templates that overlap the input only in part; one product instead of the six of the Pearson
    correlation. The plans' shifted copies are stacked over all bank bins so that one product reads the bank once
    for the whole group (alone, the product is memory-bound), and every spectrum sees the same arithmetic whatever
    its group."""
    picks = [np.flatnonzero(p.inside)[::_SCREEN_STRIDE] for p in plans]
    bounds = np.cumsum([0] + [len(k) for k in picks])
    a = np.zeros((int(bounds[-1]), work.n_rows), dtype=np.float32)  # [sum S_i, L]
    for p, k, lo in zip(plans, picks, bounds[:-1]):
        a[lo:lo + len(k), p.rows] = p.xs[k]
    scores: np.ndarray = np.maximum.reduceat(a @ work.t[block].T, bounds[:-1], axis=0) / work.norm[block]
    return scores


def _candidates(plans: Sequence[_Plan | None], work: _Work, n_candidates: int) -> list[np.ndarray | None]:
    """Per plan, the indices (sorted) of its ``n_candidates`` best-screened templates among its allowed classes.
    Each class block is screened once for all the plans that allow it, in stacks of ``_GROUP``."""
    scores: list[list[np.ndarray]] = [[] for _ in plans]
    index: list[list[np.ndarray]] = [[] for _ in plans]
    for cls, block in work.blocks.items():
        members = [i for i, p in enumerate(plans) if p is not None and (p.allowed is None or cls in p.allowed)]
        for g in range(0, len(members), _GROUP):
            chunk = members[g:g + _GROUP]
            group = [p for p in (plans[i] for i in chunk) if p is not None]  # all of them: members have plans
            for i, row in zip(chunk, _screen(group, work, block)):
                scores[i].append(row)
                index[i].append(np.arange(block.start, block.stop))
    out: list[np.ndarray | None] = []
    for sc, ix in zip(scores, index):
        if not sc:
            out.append(None)
            continue
        score, cand = np.concatenate(sc), np.concatenate(ix)
        if score.shape[0] > n_candidates:
            cand = cand[np.argpartition(score, -n_candidates)[-n_candidates:]]
        out.append(np.sort(cand))
    return out


def _finish(plan: _Plan, idx: np.ndarray, work: _Work, *, window: float, config: RefineConfig) -> _Peak | None:
    """Exact Pearson correlation of the candidates ``idx``; the best local maxima inside the window with enough
    overlap; the median of the good matches' sub-bin peaks; SNID quality of the best one."""
    corr, n = _pearson(plan.xs, plan.x2s, plan.ms, *work.columns(idx, plan.rows))
    ok = (n >= config.min_overlap * plan.n_cov) & plan.inside[:, None]
    ok[1:-1] &= (corr[1:-1] >= corr[:-2]) & (corr[1:-1] >= corr[2:])  # local maxima only
    masked = np.where(ok, corr, -np.inf)
    k_best = np.argmax(masked, axis=0)  # [C] best shift of each candidate
    peak = masked[k_best, np.arange(masked.shape[1])]
    order = np.argsort(-peak, kind="stable")[:_N_CONSENSUS]
    order = order[np.isfinite(peak[order])]
    if order.size == 0:
        return None
    order = order[peak[order] >= peak[order[0]] - _CONSENSUS_DROP]
    ks = k_best[order]  # interior rows: the first and last are never inside
    ym, y0, yp = (corr[ks + d, order].astype(np.float64) for d in (-1, 0, 1))
    curv = ym - 2.0 * y0 + yp
    frac = np.zeros_like(curv)
    if config.interpolate:
        concave = curv < 0
        frac[concave] = np.clip(0.5 * (ym - yp)[concave] / curv[concave], -0.5, 0.5)
    ln_mid = math.log1p(plan.z_prior)
    ln_zs = np.clip((plan.shifts[ks] + frac) * work.dln, ln_mid - window, ln_mid + window)
    j, k = int(order[0]), int(ks[0])
    tpl = int(idx[j])
    r, lap_bins, width_ln = _quality(plan.xm, plan.m, int(plan.shifts[k]), tpl, work)
    med = float(np.median(ln_zs))
    spread = 1.4826 * float(np.median(np.abs(ln_zs - med)))
    return _Peak(template=tpl, z=math.expm1(med), r=r, lap=lap_bins * work.dln, corr=float(corr[k, j]),
                 width=width_ln, spread=spread, n_good=len(ln_zs))


def _quality(xm: np.ndarray, m: np.ndarray, shift: int, tpl: int, work: _Work) -> tuple[float, float, float]:
    """SNID r-value, overlap (bins) and peak FWHM (ln units) of template ``tpl`` around integer ``shift``."""
    n_in, n_rows = xm.shape[0], work.n_rows
    n_shift = 2 * _WIDE + 1
    width = n_in + n_shift - 1
    r0 = work.offset - (shift + _WIDE)
    c0, c1 = max(0, -r0), width - max(0, r0 + width - n_rows)
    rows = slice(r0 + c0, r0 + c1)
    xs, x2s, ms = (_shifted(v, n_shift, width)[:, c0:c1] for v in (xm, xm * xm, m))
    corr, n = _pearson(xs, x2s, ms, *work.columns(np.array([tpl]), rows))
    c = np.where(n[:, 0] >= _MIN_BINS, corr[:, 0], 0.0).astype(np.float64)  # lag d = k - _WIDE at row k
    h = c[_WIDE]
    anti = 0.5 * (c[_WIDE + 1:] - c[_WIDE - 1::-1])
    sigma_a = math.sqrt(float(np.mean(anti * anti)))
    r = _R_MAX if sigma_a * math.sqrt(2.0) * _R_MAX <= h else max(h, 0.0) / (math.sqrt(2.0) * sigma_a)
    return r, float(n[_WIDE, 0]), _fwhm(c, _WIDE) * work.dln


def _fwhm(c: np.ndarray, centre: int) -> float:
    """Full width (bins) where ``c`` falls to half its value at ``centre``, interpolated; the whole span if never."""
    half = 0.5 * c[centre]
    if half <= 0:
        return float(centre * 2)
    widths = []
    for step in (1, -1):
        i = centre
        while 0 <= i + step < c.shape[0] and c[i + step] > half:
            i += step
        if not 0 <= i + step < c.shape[0]:
            widths.append(float(abs(i - centre)))
            continue
        a, b = c[i], c[i + step]
        widths.append(abs(i - centre) + (a - half) / (a - b))
    return float(sum(widths))
