"""Choose the real spectra that the end-to-end test runs on, deterministically, from the shared manifest.

Why a script: the fixture set must be reproducible and reviewable. Rerunning it on the same manifest copies the same
files and rewrites ``tests/data/spectra/MANIFEST.csv`` and ``CREDITS.md`` byte for byte.

Selection: only observed spectra (manifest paths under ``spectra/``; templates are training's business), minus
uncertain labels (types ending in ``?``). Slots go to classes in proportion to the square root of their size (every
class gets one before any gets two), so common classes dominate less than in the archive and rare ones still appear.
Within a class the smallest files win, one spectrum per object before a second of the same object. The SEDM spectrum
in ``REQUIRED`` is always included, because the reader tests convert it to pysedm format.

Only spectra the model can use go to ``spectra/`` (positive wavelengths covering at least ``MIN_OVERLAP_AA`` of the
model grid): the end-to-end test expects every one of them to be classified. The archive's real broken spectra (HST
files with zero or near-zero wavelengths, infrared-only spectra) go to ``bad_spectra/``: the dead-letter tests use them.

Usage::

    python tests/data/select_fixtures.py [--shared-data ../shared/data] [--count 200]
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED_DATA = HERE.parents[2] / "shared" / "data"
OUT_DIR = HERE / "spectra"
COUNT = 200
BAD_DIR = HERE / "bad_spectra"
REQUIRED = ("spectra/slsne/2019dwa_TNS_ZTF_SEDM_2019.0514.txt",)
GRID_AA = (3500.0, 10000.0)
MIN_OVERLAP_AA = 1500.0
BAD_COUNT = 6


def overlap_aa(path: Path) -> float:
    """Wavelength range shared with the model grid [A]; -inf when any wavelength is not positive."""
    wave = np.loadtxt(path, comments="#", usecols=0, ndmin=1)
    if wave.size < 20 or not np.all(wave > 0):
        return -np.inf
    return float(min(wave.max(), GRID_AA[1]) - max(wave.min(), GRID_AA[0]))


@dataclass(frozen=True)
class Candidate:
    """One manifest row plus the file size that orders candidates."""

    row: dict[str, str]
    size: int

    @property
    def path(self) -> str:
        return self.row["path"]


def load_candidates(*, shared_data: Path) -> tuple[list[str], list[Candidate]]:
    """Return the manifest's column names and its usable spectrum rows (existing files, certain labels)."""
    with (shared_data / "manifest.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        fieldnames = list(reader.fieldnames or [])
        rows = list(reader)
    candidates = [
        Candidate(row=row, size=(shared_data / row["path"]).stat().st_size)
        for row in rows
        if row["path"].startswith("spectra/") and not row["type"].endswith("?")
        and (shared_data / row["path"]).is_file()
    ]
    return fieldnames, candidates


def order_within_class(candidates: list[Candidate]) -> list[Candidate]:
    """Smallest first, but every object once before any object twice (more objects, not more epochs)."""
    by_size = sorted(candidates, key=lambda c: (c.size, c.path))
    seen: Counter[str] = Counter()
    ranked: list[tuple[int, int, str, Candidate]] = []
    for candidate in by_size:
        epoch = seen[candidate.row["object"]]
        seen[candidate.row["object"]] += 1
        ranked.append((epoch, candidate.size, candidate.path, candidate))
    return [item[-1] for item in sorted(ranked, key=lambda item: item[:3])]


def select(candidates: list[Candidate], *, count: int, required: tuple[str, ...]) -> list[Candidate]:
    """Give each next slot to the class with the fewest picks per sqrt(class size); ties go to the larger class."""
    by_class: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_class[candidate.row["type"]].append(candidate)
    queues = {label: order_within_class(members) for label, members in by_class.items()}
    weight = {label: math.sqrt(len(members)) for label, members in by_class.items()}

    chosen: list[Candidate] = []
    taken: Counter[str] = Counter()
    for path in required:
        match = next(c for queue in queues.values() for c in queue if c.path == path)
        queues[match.row["type"]].remove(match)
        chosen.append(match)
        taken[match.row["type"]] += 1

    while len(chosen) < count:
        open_classes = [label for label, queue in queues.items() if queue]
        if not open_classes:
            raise SystemExit(f"only {len(chosen)} candidate spectra, {count} requested")
        label = min(open_classes, key=lambda lab: (taken[lab] / weight[lab], -len(by_class[lab]), lab))
        chosen.append(queues[label].pop(0))
        taken[label] += 1
    return sorted(chosen, key=lambda c: Path(c.path).name)


def credits_markdown(chosen: list[Candidate]) -> str:
    """Summarise sources, licences and references of the chosen spectra, one section per source."""
    by_source: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in chosen:
        by_source[candidate.row["source"]].append(candidate)
    lines = [
        "# Credits for the spectra in this folder",
        "",
        f"{len(chosen)} real spectra copied unchanged from the project's shared data set by `../select_fixtures.py`;",
        "`MANIFEST.csv` lists each file with its object, classification, reference and licence.",
        "Please cite the original references when using these data.",
    ]
    for source in sorted(by_source):
        members = by_source[source]
        licences = sorted({c.row["license"] for c in members})
        references: Counter[str] = Counter()
        for candidate in members:
            for reference in candidate.row["reference"].split(";"):
                if reference.strip():
                    references[reference.strip()] += 1
        lines += ["", f"## {source} ({len(members)} spectra)", ""]
        lines += [f"- Licence: {licence}" for licence in licences]
        lines += ["- References (number of spectra):"]
        lines += [f"  - {ref} ({n})" for ref, n in sorted(references.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "\n".join(lines) + "\n"


def write_fixtures(chosen: list[Candidate], *, fieldnames: list[str], shared_data: Path, out_dir: Path) -> None:
    """Copy the files, drop stale ones from earlier runs, and write MANIFEST.csv and CREDITS.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = {Path(c.path).name for c in chosen}
    for stale in out_dir.glob("*.txt"):
        if stale.name not in keep:
            stale.unlink()
    for candidate in chosen:
        shutil.copyfile(shared_data / candidate.path, out_dir / Path(candidate.path).name)
    with (out_dir / "MANIFEST.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, lineterminator="\n")
        writer.writeheader()
        for candidate in chosen:
            writer.writerow({**candidate.row, "path": Path(candidate.path).name})
    (out_dir / "CREDITS.md").write_text(credits_markdown(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA)
    parser.add_argument("--count", type=int, default=COUNT)
    args = parser.parse_args()
    fieldnames, candidates = load_candidates(shared_data=args.shared_data)
    overlap = {c.path: overlap_aa(args.shared_data / c.path) for c in candidates}
    chosen = select([c for c in candidates if overlap[c.path] >= MIN_OVERLAP_AA], count=args.count,
                    required=REQUIRED)
    write_fixtures(chosen, fieldnames=fieldnames, shared_data=args.shared_data, out_dir=OUT_DIR)
    hopeless = [c for c in candidates if overlap[c.path] < 100.0]  # clearly off the grid or broken
    bad = sorted(hopeless, key=lambda c: (c.size, c.path))[:BAD_COUNT]
    write_fixtures(bad, fieldnames=fieldnames, shared_data=args.shared_data, out_dir=BAD_DIR)
    total = sum(c.size for c in chosen)
    classes = Counter(c.row["type"] for c in chosen)
    print(f"{len(chosen)} spectra, {total / 1e6:.2f} MB, {len(classes)} classes: {dict(classes.most_common())}")


if __name__ == "__main__":
    main()
