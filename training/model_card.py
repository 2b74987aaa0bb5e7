"""Markdown tables for the model card from a checkpoint card and an evaluation's ``metrics.json``.

``python -m spectranet.training.model_card CHECKPOINT METRICS_JSON`` prints them; the
prose around them is written by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.training.evaluate import TARGETS

__all__ = ["data_table", "metrics_table", "per_class_table"]


def data_table(card: dict[str, Any]) -> str:
    data = card["extra"]["data"]
    rows = ["| class | train spectra | train objects | val spectra | val objects | sources (train) |",
            "|---|---:|---:|---:|---:|---|"]
    for cls in CLASSES:
        t, v = data["train"][cls], data["val"][cls]
        sources = ", ".join(f"{k} {n}" for k, n in t.items() if k not in ("spectra", "objects"))
        rows.append(f"| {cls} | {t['spectra']} | {t['objects']} | {v['spectra']} | {v['objects']} | {sources} |")
    return "\n".join(rows)


def _fmt(v: float) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def metrics_table(summary: dict[str, Any]) -> str:
    names = {"ia_vs_non_ia_accuracy": "Ia vs non-Ia accuracy", "h_rich_vs_h_poor_accuracy": "H-rich vs H-poor accuracy",
             "macro_f1": "macro-F1", "z_rms": "z RMS of dz/(1+z)", "z_outlier_fraction": "z outliers, abs(dz) > 0.15"}
    rows = ["| metric | target | SpectraNet | template baseline | target met | beats baseline |",
            "|---|---|---:|---:|---|---|"]
    for key, label in names.items():
        op, value = TARGETS[key]
        base = summary.get("baseline", {}).get(key, float("nan"))
        rows.append(f"| {label} | {op} {value} | {_fmt(summary['SpectraNet'][key])} | {_fmt(base)} | "
                    f"{'yes' if summary['SpectraNet_meets_target'][key] else '**no**'} | "
                    f"{'yes' if summary.get('SpectraNet_beats_baseline', {}).get(key) else '**no**'} |")
    for key, label in (("accuracy", "accuracy (9 classes)"), ("z_nmad", "z NMAD")):
        base = summary.get("baseline", {}).get(key, float("nan"))
        rows.append(f"| {label} | - | {_fmt(summary['SpectraNet'][key])} | {_fmt(base)} | - | - |")
    return "\n".join(rows)


def per_class_table(model: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    rows = ["| class | support | precision | recall | F1 | baseline F1 |", "|---|---:|---:|---:|---:|---:|"]
    for cls in CLASSES:
        m = model["per_class"][cls]
        b = baseline["per_class"][cls]["f1"] if baseline else float("nan")
        rows.append(f"| {cls} | {m['support']} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {b:.3f} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    card = json.loads(Path(argv[0]).with_suffix(".json").read_text()) if argv[0].endswith(".json") else \
        json.loads(Path(argv[0] + ".json").read_text())
    report = json.loads(Path(argv[1]).read_text())
    print(data_table(card), "\n")
    print(metrics_table(report["summary"]), "\n")
    for name, s in report["sets"].items():
        print(f"**{name}** (n = {s['n']})\n")
        print(per_class_table(s["model"], s.get("baseline")), "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
