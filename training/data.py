"""Labelled spectra for training and evaluation: read a manifest, map labels, split by object.

Every source in ``../shared/data/manifest.csv`` is read into one ``Spectrum`` per epoch, in the *rest frame*, with a
continuum-like flux (positive, median 1): the simulator (``training.simulate``) then redshifts it to a drawn z and
degrades it to SEDM. Two quirks of the data are handled here, once:

- SNID ``.lnw`` templates hold several epochs per file, continuum-flattened (flux / continuum - 1) and zero-padded
  outside their range; SNID-SAGE templates are flattened too. Flattened flux gets ``+ 1`` so that it is a
  continuum-divided spectrum; the model's SNID-style continuum removal then treats it like any calibrated spectrum.
- Some slsne files store the *variance* in the column labelled ``flux_err`` (values ~1e-31 next to flux ~1e-15):
  a ``flux_err`` whose median is below 1e-6 of the median |flux| is read as a variance and square-rooted.

Spectra that do not reach the model grid at their own redshift (HST files at 0-40 A, IR-only spectra) are dropped,
and so are labels that ``science.taxonomy.map_label`` calls ambiguous. ``split_by_object`` assigns whole objects
(names canonicalised across sources: ``SN 2011fe`` = ``sn2011fe`` = ``2011fe``) to train or validation, stratified by
class with a fixed seed, so no object ever has spectra on both sides.

Users point ``read_labelled_entries`` at their own CSV (``path, type, redshift[, phase]``) of files in any format that
``spectranet.streamer.contract.readers.read_spectrum`` knows.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from spectranet.streamer.contract.readers import read_spectrum
from spectranet.streamer.errors import SpectraNetError
from spectranet.streamer.science.preprocess import PreprocessConfig, to_angstrom
from spectranet.streamer.science.taxonomy import CLASSES, map_label

__all__ = ["Spectrum", "ManifestEntry", "Split", "DEFAULT_DATA_DIR", "read_manifest", "read_labelled_entries",
           "read_lnw", "load_spectra", "load_galaxies", "canonical_object", "object_key", "split_by_object",
           "drop_leaked", "counts_table", "save_pack", "load_pack"]

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GALAXY_SOURCE = "galaxies"
_MIN_GRID_OVERLAP_AA = 1500.0  # a usable spectrum covers at least this much of 3500-10000 A at its own redshift
_GRID = (PreprocessConfig().grid.wave_min, PreprocessConfig().grid.wave_max)  # the model's wavelength range


@dataclass(frozen=True)
class ManifestEntry:
    """One row of a manifest: a file and what it is."""

    path: Path
    object_id: str
    raw_type: str
    label: str | None  # taxonomy class, None when ambiguous or outside the taxonomy
    redshift: float | None
    source: str = "user"
    frame: str = "observed"
    flux_kind: str = "calibrated"
    phase: float | None = None
    instrument: str = ""


@dataclass(frozen=True, eq=False)
class Spectrum:
    """One epoch in the rest frame: wavelength in Angstrom (as the file gives it, usually air), flux median 1."""

    wave: np.ndarray  # float64 [n], rest frame, increasing
    flux: np.ndarray  # float64 [n], continuum-like, median 1
    label: str
    object_id: str  # canonical object name
    source: str
    redshift: float  # of the original observation (0 for rest-frame templates)
    phase: float | None
    path: str
    epoch: int = 0
    instrument: str = ""


@dataclass(frozen=True)
class Split:
    train: tuple[Spectrum, ...]
    val: tuple[Spectrum, ...]
    val_objects: frozenset[str]


# ---------------------------------------------------------------------------------------------------------- manifest


def canonical_object(name: str) -> str:
    """Name under which spectra of one object from different sources meet: lower case, no 'sn'/'at', alnum only.

    The first rule (splits "v1"); ``object_key`` also joins SNID's two-digit-year template names to their objects."""
    s = re.sub(r"[^a-z0-9]", "", name.strip().lower())
    return re.sub(r"^(sn|at)(?=\d{4})", "", s)


_TWO_DIGIT_YEAR = re.compile(r"^(?:sn)?(\d{2})([a-z]{1,3})$")


def object_key(name: str) -> str:
    """``canonical_object`` plus SNID template names: ``sn02cs``, ``sn02cs_bsnip`` and ``SN 2002cs`` are one object.

    Works on raw names and on ``canonical_object`` output alike. Splits "v2" group by it; under "v1" the template
    ``sn02cs`` and the spectra of SN 2002cs could fall on opposite sides of the split."""
    s = re.sub(r"bsnip$", "", re.sub(r"[^a-z0-9]", "", name.strip().lower()))
    m = _TWO_DIGIT_YEAR.match(s)
    if m:
        yy = int(m.group(1))
        s = f"{1900 + yy if yy >= 50 else 2000 + yy}{m.group(2)}"
    return re.sub(r"^(sn|at)(?=\d{4})", "", s)


def _float_or_none(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def read_manifest(path: str | Path, *, root: str | Path | None = None) -> list[ManifestEntry]:
    """Rows of a manifest CSV; ``path`` columns are relative to ``root`` (default: the CSV's folder).

    Required columns: ``path``, ``type``; ``redshift`` is required for observed-frame files (it is the target of the
    redshift head). Optional: ``object`` (default: the file stem), ``phase`` or ``phase_days``, ``source``, ``frame``,
    ``flux_kind``, ``instrument``.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    entries: list[ManifestEntry] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "type"} - set(reader.fieldnames or ())
        if missing:
            raise SpectraNetError(f"{path}: manifest lacks column(s) {sorted(missing)}")
        for row in reader:
            file = Path(row["path"])
            entries.append(ManifestEntry(
                path=file if file.is_absolute() else base / file,
                object_id=row.get("object") or file.stem,
                raw_type=row["type"], label=map_label(row["type"]),
                redshift=_float_or_none(row.get("redshift")),
                source=row.get("source") or "user", frame=row.get("frame") or "observed",
                flux_kind=row.get("flux_kind") or "calibrated",
                phase=_float_or_none(row.get("phase") or row.get("phase_days")),
                instrument=row.get("instrument") or "",
            ))
    return entries


def read_labelled_entries(path: str | Path, *, root: str | Path | None = None) -> list[ManifestEntry]:
    """A user's own manifest (path, type, redshift[, phase]) of spectrum files, ambiguous labels dropped."""
    return [e for e in read_manifest(path, root=root) if e.label is not None]


# ------------------------------------------------------------------------------------------------------------ readers


def read_lnw(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """A SNID ``.lnw`` template: (wavelength [n], flattened flux [n_epochs, n], phases [n_epochs], type).

    Layout: a header line ``n_epochs n_wave w_min w_max n_spline name dm15 type ...``, ``n_spline + 1`` lines of
    continuum spline knots, one line ``flag phase_1 .. phase_k``, then ``n_wave`` rows ``wavelength f_1 .. f_k``.
    Flux outside each epoch's range is exactly 0.
    """
    lines = Path(path).read_text().splitlines()
    head = lines[0].split()
    n_epochs, n_wave, n_spline = int(head[0]), int(head[1]), int(head[4])
    sn_type = head[7] if len(head) > 7 else ""
    phase_row = 1 + n_spline + 1
    phases = np.array([float(x) for x in lines[phase_row].split()[1:1 + n_epochs]])
    table = np.array([[float(x) for x in line.split()] for line in lines[phase_row + 1: phase_row + 1 + n_wave]])
    return table[:, 0], table[:, 1:1 + n_epochs].T, phases, sn_type


def _median_one(wave: np.ndarray, flux: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    ok = np.isfinite(wave) & np.isfinite(flux)
    wave, flux = wave[ok], flux[ok]
    order = np.argsort(wave)
    wave, flux = wave[order], flux[order]
    scale = np.median(flux) if flux.size else 0.0
    if flux.size < 20 or not (scale > 0):
        return None  # a spectrum whose median flux is not positive is junk (or background-subtracted noise)
    return wave, flux / scale


def _grid_overlap(wave_obs: np.ndarray) -> float:
    return max(0.0, min(wave_obs[-1], _GRID[1]) - max(wave_obs[0], _GRID[0]))


def _entry_spectra(entry: ManifestEntry) -> list[Spectrum]:
    """The rest-frame epochs of one manifest row (several for .lnw files); [] when unusable."""
    z = entry.redshift or 0.0
    common: dict[str, Any] = dict(label=entry.label, object_id=canonical_object(entry.object_id),
                                  source=entry.source, path=str(entry.path), instrument=entry.instrument)
    if entry.path.suffix == ".lnw":
        wave, fluxes, phases, _ = read_lnw(entry.path)
        out = []
        for i, (f, phase) in enumerate(zip(fluxes, phases)):
            nz = np.flatnonzero(f != 0.0)
            if nz.size < 20:
                continue
            sl = slice(nz[0], nz[-1] + 1)
            got = _median_one(wave[sl], f[sl] + 1.0)
            if got is not None and _grid_overlap(got[0]) >= _MIN_GRID_OVERLAP_AA:
                out.append(Spectrum(wave=got[0], flux=got[1], redshift=0.0, phase=float(phase), epoch=i, **common))
        return out
    sf = read_spectrum(entry.path)
    wave = to_angstrom(np.asarray(sf.wavelength), sf.wavelength_unit)
    flux = np.asarray(sf.flux, dtype=np.float64)
    if entry.flux_kind == "flattened":
        flux = flux + 1.0
    got = _median_one(wave, flux)
    if got is None:
        return []
    wave, flux = got
    frame = sf.frame if sf.frame in ("observed", "rest") else entry.frame
    obs = wave if frame == "observed" else wave * (1.0 + z)
    if _grid_overlap(obs) < _MIN_GRID_OVERLAP_AA:
        return []  # junk (HST 0-40 A, IR only): never reaches the SEDM range
    rest = obs / (1.0 + z)
    return [Spectrum(wave=rest, flux=flux, redshift=z, phase=entry.phase, **common)]


def load_spectra(entries: Iterable[ManifestEntry], *, on_error: str = "skip") -> tuple[list[Spectrum], Counter]:
    """Spectra for the labelled entries, plus a Counter of why others were dropped (reason -> count)."""
    out: list[Spectrum] = []
    dropped: Counter = Counter()
    for entry in entries:
        if entry.source == GALAXY_SOURCE:
            continue
        if entry.label is None:
            dropped["ambiguous or outside taxonomy"] += 1
            continue
        if entry.frame == "observed" and entry.redshift is None:
            dropped["no redshift"] += 1
            continue
        try:
            got = _entry_spectra(entry)
        except (SpectraNetError, ValueError, OSError) as exc:
            if on_error != "skip":
                raise
            dropped[f"unreadable ({type(exc).__name__})"] += 1
            continue
        if not got:
            dropped["no overlap with the grid"] += 1
        out.extend(got)
    return out, dropped


def load_galaxies(entries: Iterable[ManifestEntry]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rest-frame host-galaxy templates (wave, flux median 1) for the simulator's host contamination."""
    out = []
    for entry in entries:
        if entry.source != GALAXY_SOURCE:
            continue
        sf = read_spectrum(entry.path)
        wave = to_angstrom(np.asarray(sf.wavelength), sf.wavelength_unit)
        flux = np.asarray(sf.flux, dtype=np.float64)
        keep = flux > 0
        got = _median_one(wave[keep], flux[keep])
        if got is not None:
            out.append(got)
    return out


# -------------------------------------------------------------------------------------------------------------- split


HOLDOUT_SOURCES = ("sedm",)  # real target-instrument spectra: their objects are always validation objects


def split_by_object(spectra: Sequence[Spectrum], *, val_fraction: float = 0.2, seed: int = 0,
                    holdout_sources: Sequence[str] = HOLDOUT_SOURCES, names: str = "v2") -> Split:
    """Whole objects to train or validation, stratified by each object's (majority) class, reproducibly.

    Every class with at least two objects gets at least one validation object, so that every class is scored.
    Objects with a spectrum from ``holdout_sources`` (the real SEDM spectra) are always in validation and count
    towards their class's share, so that the target instrument is scored on objects the model never saw.
    ``names``: "v2" groups spectra by ``object_key``; "v1" (runs before 0.4.1) by ``canonical_object`` alone.
    """
    if names not in ("v1", "v2"):
        raise ValueError(f"names must be 'v1' or 'v2', got {names!r}")
    key = object_key if names == "v2" else (lambda name: name)
    forced = {key(s.object_id) for s in spectra if s.source in holdout_sources}
    votes: dict[str, Counter] = defaultdict(Counter)
    for s in spectra:
        votes[key(s.object_id)][s.label] += 1
    by_class: dict[str, list[str]] = defaultdict(list)
    for obj in sorted(votes):
        by_class[votes[obj].most_common(1)[0][0]].append(obj)
    rng = np.random.default_rng(seed)
    val_objects: set[str] = set()
    for cls in sorted(by_class):
        objs = by_class[cls]
        order = rng.permutation(len(objs))
        n_val = int(round(val_fraction * len(objs)))
        n_val = max(n_val, 1) if len(objs) >= 2 else 0
        held = [o for o in objs if o in forced]
        free = [objs[i] for i in order if objs[i] not in forced]
        val_objects.update(held)
        val_objects.update(free[:max(n_val - len(held), 0)])
    train = tuple(s for s in spectra if key(s.object_id) not in val_objects)
    val = tuple(s for s in spectra if key(s.object_id) in val_objects)
    return Split(train=train, val=val, val_objects=frozenset(val_objects))


def drop_leaked(train: Sequence[Spectrum], val: Sequence[Spectrum]) -> tuple[list[Spectrum], int]:
    """Validation spectra whose object (by ``object_key``) has no spectrum in ``train``, and how many were dropped:
    a split made under the "v1" names can hold SNID's ``sn02cs`` in training and SN 2002cs in validation."""
    seen = {object_key(s.object_id) for s in train}
    kept = [s for s in val if object_key(s.object_id) not in seen]
    return kept, len(val) - len(kept)


def counts_table(spectra: Sequence[Spectrum]) -> dict[str, dict[str, int]]:
    """{class: {source: n_spectra, ..., 'objects': n_objects}} in taxonomy order: the counts a model card reports."""
    table: dict[str, dict[str, int]] = {}
    for cls in CLASSES:
        members = [s for s in spectra if s.label == cls]
        row = dict(sorted(Counter(s.source for s in members).items()))
        row["spectra"] = len(members)
        row["objects"] = len({s.object_id for s in members})
        table[cls] = row
    return table


# --------------------------------------------------------------------------------------------------------------- pack


_FLOAT16_MAX = 65000.0
_PACK_FIELDS = ("label", "object_id", "source", "redshift", "phase", "path", "epoch", "instrument")


def save_pack(path: str | Path, *, train: Sequence[Spectrum], val: Sequence[Spectrum],
              galaxies: Sequence[tuple[np.ndarray, np.ndarray]], summary: dict) -> None:
    """A loaded split as one compressed ``.npz`` (wavelength float32, flux float16), to train where the data is not.

    A GPU machine that cannot see ``../shared/data`` gets this file instead (~30 MB for the whole set); float16 keeps
    3 significant digits of a median-1 flux, finer than the noise the simulator adds at S/N 100. Pixels beyond
    +-65,000 times the median (junk spikes in a handful of OSC files, up to 1e22) are clipped there.
    """
    arrays: dict[str, Any] = {}  # name -> ndarray (typed Any: savez_compressed's ** also reads allow_pickle)
    for part, spectra in (("train", train), ("val", val)):
        arrays[f"{part}_wave"] = np.concatenate([s.wave for s in spectra]).astype(np.float32)
        flux = np.concatenate([s.flux for s in spectra])
        arrays[f"{part}_flux"] = np.clip(flux, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)
        arrays[f"{part}_len"] = np.array([s.wave.size for s in spectra], dtype=np.int64)
        arrays[f"{part}_meta"] = np.array(json.dumps([{k: getattr(s, k) for k in _PACK_FIELDS} for s in spectra]))
    arrays["galaxy_wave"] = np.concatenate([g[0] for g in galaxies]).astype(np.float32)
    arrays["galaxy_flux"] = np.concatenate([g[1] for g in galaxies]).astype(np.float32)
    arrays["galaxy_len"] = np.array([g[0].size for g in galaxies], dtype=np.int64)
    arrays["summary"] = np.array(json.dumps(summary))
    np.savez_compressed(path, **arrays)


def load_pack(path: str | Path) -> tuple[list[Spectrum], list[Spectrum], list[tuple[np.ndarray, np.ndarray]], dict]:
    """(train, validation, galaxies, summary) from ``save_pack``'s file."""
    with np.load(path, allow_pickle=False) as z:
        parts = []
        for part in ("train", "val"):
            bounds = np.concatenate(([0], np.cumsum(z[f"{part}_len"])))
            wave, flux = z[f"{part}_wave"].astype(np.float64), z[f"{part}_flux"].astype(np.float64)
            meta = json.loads(str(z[f"{part}_meta"]))
            parts.append([Spectrum(wave=wave[a:b], flux=flux[a:b], **m)
                          for a, b, m in zip(bounds[:-1], bounds[1:], meta)])
        bounds = np.concatenate(([0], np.cumsum(z["galaxy_len"])))
        galaxies = [(z["galaxy_wave"][a:b].astype(np.float64), z["galaxy_flux"][a:b].astype(np.float64))
                    for a, b in zip(bounds[:-1], bounds[1:])]
        summary = json.loads(str(z["summary"]))
    return parts[0], parts[1], galaxies, summary
