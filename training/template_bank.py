"""Build the template bank that refines redshifts (``spectranet.streamer.science.templates``).

``python -m spectranet.training.template_bank --out streamer/models/templates/spectranet-templates-1.0.npz
[--exclude-objects FILE]`` reads the SNID templates (Blondin & Tonry 2007, BSNIP, Liu & Modjaz 2016; as shipped
with DASH, MIT) and the Super-SNID templates (Magill et al. 2025, CC0) listed in the shared-data manifest, and:

1. maps each file's type to taxonomy v1 (``map_label``) and drops ambiguous or out-of-taxonomy types;
2. drops objects named in ``--exclude-objects`` (one name per line, any spelling: names are canonicalised, and SNID's
   two-digit years are expanded, ``sn02cs`` = ``SN 2002cs``), so that an evaluation bank never contains its
   validation objects;
3. keeps the epochs within ``--phase-min``..``--phase-max`` days of maximum, at least ``--min-spacing`` days apart
   per object;
4. puts every epoch through the daemon's own ``prepare`` (air to vacuum, flux-conserving rebin, SNID-style
   continuum removal and apodisation) on a rest-frame grid with the model grid's log step, aligned to its bin edges
   and extending blueward to the templates' 2500 A;
5. writes a compressed .npz (flux in float16) and ``CREDITS.md`` beside it.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from spectranet.streamer.errors import PreprocessError
from spectranet.streamer.science.checkpoint import default_checkpoint_path, load_checkpoint
from spectranet.streamer.science.preprocess import Grid, PreprocessConfig, prepare
from spectranet.streamer.science.taxonomy import CLASSES, map_label
from spectranet.streamer.science.templates import TemplateBank, save_template_bank
from spectranet.training.data import DEFAULT_DATA_DIR, ManifestEntry, object_key, read_lnw, read_manifest

__all__ = ["BankSettings", "BANK_VERSION", "TEMPLATE_SOURCES", "read_exclusions",
           "rest_grid_for", "build_template_bank", "write_credits", "main"]

BANK_VERSION = "1.0"
TEMPLATE_SOURCES = ("snid-lnw", "super-snid")
_TEMPLATE_BLUE_AA = 2500.0  # SNID templates start here (rest frame)

CREDITS = """# Template bank credits

The templates in this folder refine SpectraNet's redshift by cross-correlation (SNID-style). They were built by
`python -m spectranet.training.template_bank` from:

- **SNID templates** (Blondin & Tonry 2007, ApJ 666, 1024; BSNIP, Silverman et al. 2012; Liu & Modjaz 2016), as
  redistributed with DASH (Muthukrishna et al. 2019, `daniel-muthukrishna/astrodash`) under the **MIT licence**.
- **Super-SNID templates** (Magill et al. 2025, `dkjmagill/QUB-SNID-Templates`), released under **CC0 1.0**.

Each epoch was rebinned onto the model's log-wavelength step, continuum-removed and apodised as SpectraNet's own
inputs are; object names, types and phases are those of the template files.
"""


@dataclass(frozen=True)
class BankSettings:
    """What the builder keeps and how; recorded in the bank's metadata."""

    phase_min: float = -20.0  # days from maximum
    phase_max: float = 60.0
    min_spacing: float = 2.0  # days between kept epochs of one object (measured: 2 d loses nothing, 0.7x the cost)
    knots_per_bin: float = 13.0 / 256.0  # continuum spline knots per grid bin, as the model input (13 over 256)
    sources: tuple[str, ...] = TEMPLATE_SOURCES


def read_exclusions(path: str | Path) -> frozenset[str]:
    """Object names to leave out, one per line (``#`` comments and blank lines ignored), canonicalised."""
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(object_key(line))
    return frozenset(names)


def rest_grid_for(grid: Grid) -> tuple[Grid, int]:
    """The bank's rest-frame grid for inputs on ``grid``: same log step, bin edges aligned with ``grid``'s, from
    ``grid.wave_max`` down to the templates' blue end. Returns (grid, offset of the input's first bin)."""
    dln = math.log(grid.wave_max / grid.wave_min) / grid.n_bins
    offset = max(0, math.ceil(math.log(grid.wave_min / _TEMPLATE_BLUE_AA) / dln))
    return Grid(grid.wave_min * math.exp(-offset * dln), grid.wave_max, grid.n_bins + offset), offset


def _epochs(entry: ManifestEntry) -> Iterable[tuple[np.ndarray, np.ndarray, float]]:
    wave, fluxes, phases, _ = read_lnw(entry.path)
    for f, phase in zip(fluxes, phases):
        nz = np.flatnonzero(f != 0.0)
        if nz.size >= 20:
            sl = slice(nz[0], nz[-1] + 1)
            yield wave[sl], f[sl] + 1.0, float(phase)  # flattened (f / continuum - 1) -> continuum-divided


def _thin(phases: Sequence[float], spacing: float) -> list[int]:
    kept: list[int] = []
    for i in np.argsort(phases, kind="stable"):
        if not kept or spacing <= 0 or phases[i] - phases[kept[-1]] >= spacing:
            kept.append(int(i))
    return kept


def build_template_bank(entries: Sequence[ManifestEntry], grid: Grid, *, settings: BankSettings = BankSettings(),
                        exclude: Collection[str] = frozenset(), log: bool = False) -> TemplateBank:
    """A bank for inputs on ``grid`` from the ``.lnw`` manifest ``entries`` (see the module docstring)."""
    rest, _ = rest_grid_for(grid)
    excluded = frozenset(object_key(x) for x in exclude)
    rows: list[tuple[int, str, float, np.ndarray, int, int, str, str]] = []
    counts: Counter[str] = Counter()
    for e in entries:
        if e.source not in settings.sources or e.path.suffix != ".lnw":
            continue
        cls = e.label if e.label is not None else map_label(e.raw_type)
        if cls is None:
            counts["ambiguous type"] += 1
            continue
        if object_key(e.object_id) in excluded:
            counts["excluded object"] += 1
            continue
        epochs = [ep for ep in _epochs(e) if settings.phase_min <= ep[2] <= settings.phase_max]
        for i in _thin([ep[2] for ep in epochs], settings.min_spacing):
            wave, flux, phase = epochs[i]
            n_cov = np.count_nonzero((rest.edges()[:-1] >= wave[0]) & (rest.edges()[1:] <= wave[-1]))
            knots = max(4, int(round(settings.knots_per_bin * n_cov)))
            cfg = PreprocessConfig(grid=rest, normalisation="continuum", min_coverage=0.05, continuum_knots=knots)
            try:
                p = prepare(wave, flux, flux_unit="", flux_calibrated=False, medium="air", config=cfg)
            except PreprocessError:
                counts["unusable epoch"] += 1
                continue
            idx = np.flatnonzero(p.coverage)
            rows.append((CLASSES.index(cls), e.object_id, phase, p.flux, int(idx[0]), int(idx[-1]) + 1,
                         e.raw_type, e.source))
            counts[f"kept {e.source}"] += 1
    if not rows:
        raise PreprocessError("no template survived the selection", field="templates")
    rows.sort(key=lambda r: (r[0], r[1].lower(), r[2]))
    if log:
        print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return TemplateBank(
        grid=rest, flux=np.stack([r[3] for r in rows]).astype(np.float32),
        start=np.array([r[4] for r in rows], dtype=np.int64), stop=np.array([r[5] for r in rows], dtype=np.int64),
        objects=tuple(r[1] for r in rows), types=tuple(r[6] for r in rows),
        classes=tuple(CLASSES[r[0]] for r in rows), phases=np.array([r[2] for r in rows], dtype=np.float64),
        sources=tuple(r[7] for r in rows),
        meta={"version": BANK_VERSION, "input_grid": grid.to_dict(), "phase_min": settings.phase_min,
              "phase_max": settings.phase_max, "min_spacing": settings.min_spacing,
              "knots_per_bin": settings.knots_per_bin, "sources": list(settings.sources),
              "n_excluded_objects": len(excluded), "counts": dict(counts),
              "credits": "SNID templates via DASH (MIT); Super-SNID, Magill et al. 2025 (CC0 1.0)"},
    )


def write_credits(folder: str | Path) -> Path:
    path = Path(folder) / "CREDITS.md"
    path.write_text(CREDITS)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spectranet.training.template_bank",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output .npz (CREDITS.md is written beside it)")
    ap.add_argument("--manifest", default=str(DEFAULT_DATA_DIR / "manifest.csv"), help="shared-data manifest")
    ap.add_argument("--model", default=None, help="checkpoint whose grid the bank serves (default: the shipped one)")
    ap.add_argument("--exclude-objects", default=None, help="file of object names to leave out, one per line")
    ap.add_argument("--phase-min", type=float, default=BankSettings.phase_min)
    ap.add_argument("--phase-max", type=float, default=BankSettings.phase_max)
    ap.add_argument("--min-spacing", type=float, default=BankSettings.min_spacing)
    args = ap.parse_args(argv)
    grid = load_checkpoint(args.model or default_checkpoint_path()).preprocess.grid
    settings = BankSettings(phase_min=args.phase_min, phase_max=args.phase_max, min_spacing=args.min_spacing)
    exclude = read_exclusions(args.exclude_objects) if args.exclude_objects else frozenset()
    bank = build_template_bank(read_manifest(args.manifest), grid, settings=settings, exclude=exclude, log=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = save_template_bank(bank, out)
    write_credits(out.parent)
    print(f"{out}: {len(bank)} templates of {len(set(bank.objects))} objects, {out.stat().st_size / 1e6:.1f} MB, "
          f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
