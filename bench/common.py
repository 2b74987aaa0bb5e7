"""Shared by the benchmarks: the real test spectra as packets, the machine description, small statistics."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPECTRA = ROOT / "tests" / "data" / "spectra"

__all__ = ["ROOT", "SPECTRA", "base_packets", "packets", "machine", "load", "percentile"]


def base_packets() -> list[dict[str, Any]]:
    """One packet per real spectrum in tests/data/spectra (200 files)."""
    from spectranet.streamer.contract.readers import read_spectrum
    from spectranet.streamer.tools.files import packet_from_file

    return [packet_from_file(read_spectrum(p)) for p in sorted(SPECTRA.glob("*.txt"))]


def packets(n: int, *, first_revision: int = 0, base: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``n`` packets: the real spectra replicated, each copy with its own revision (unique result rows)."""
    base = base if base is not None else base_packets()
    return [dict(base[i % len(base)], revision=first_revision + i // len(base)) for i in range(n)]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return float("nan")


def machine(threads: int) -> dict[str, Any]:
    import numpy as np
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "streamer"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.strip() + (" (streamer/ modified)" if dirty else ""),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "ram_gb": _ram_gb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": threads,
        "load_average": load(),
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation), ``q`` in 0..100."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]
