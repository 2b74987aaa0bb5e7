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

__all__ = ["data_table", "metrics_table", "decisions_table", "sets_table", "ood_table", "per_class_table"]


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


_NAMES = {"ia_vs_non_ia_accuracy": "Ia vs non-Ia accuracy", "h_rich_vs_h_poor_accuracy": "H-rich vs H-poor accuracy",
          "macro_f1": "macro-F1", "ia_purity_at_90_completeness": "Ia purity at 90% completeness",
          "z_nmad": "z NMAD of dz/(1+z)", "z_outlier_fraction": "z outliers, abs(dz) > 0.15",
          "ece": "ECE (cross-fitted)"}


def metrics_table(summary: dict[str, Any]) -> str:
    """Targets vs SpectraNet (network z), SpectraNet + templates (refined z) and the template matcher, headline set."""
    rows = ["| metric | target | SpectraNet | + templates (shipped) | template matcher | target met | beats matcher |",
            "|---|---|---:|---:|---:|---|---|"]
    for key, label in _NAMES.items():
        op, value = TARGETS[key]
        net = summary["SpectraNet"].get(key, float("nan"))
        ref = summary["SpectraNet + templates"].get(key, float("nan"))
        base = summary.get("baseline", {}).get(key, float("nan"))
        met = summary["SpectraNet_meets_target"].get(key)
        beats = summary.get("SpectraNet_beats_baseline", {}).get(key)
        rows.append(f"| {label} | {op} {value} | {_fmt(net)} | {_fmt(ref)} | {_fmt(base)} | "
                    f"{'yes' if met else '**no**'} | {'yes' if beats else '**no**'} |")
    for key, label in (("accuracy", "accuracy (9 classes)"), ("z_rms", "z RMS")):
        rows.append(f"| {label} | - | {_fmt(summary['SpectraNet'][key])} | "
                    f"{_fmt(summary['SpectraNet + templates'][key])} | "
                    f"{_fmt(summary.get('baseline', {}).get(key, float('nan')))} | - | - |")
    return "\n".join(rows)


def decisions_table(summary: dict[str, Any]) -> str:
    """The questions asked of one reported class per spectrum: the most probable class (``top_class``) against the
    class called down the taxonomy's tree (``called_class``), and the template matcher's class."""
    d = summary.get("decisions")
    if not d:
        return ""
    ours, base = d["SpectraNet + templates"], d.get("baseline", {}).get("top_class", {})
    rows = ["| reported class | Ia vs non-Ia | H-rich vs H-poor (class in the right group) | macro-F1 | accuracy |",
            "|---|---:|---:|---:|---:|"]
    keys = ("ia_vs_non_ia_accuracy", "h_rich_vs_h_poor_accuracy", "macro_f1", "accuracy")
    for label, m in (("top_class (most probable)", ours["top_class"]), ("called_class (down the tree)",
                                                                       ours["called_class"]),
                     ("template matcher", base)):
        if m:
            rows.append(f"| {label} | " + " | ".join(_fmt(m[k]) for k in keys) + " |")
    return "\n".join(rows)


def sets_table(report: dict[str, Any]) -> str:
    """Every set, every predictor: the headline metrics side by side."""
    keys = ("ia_vs_non_ia_accuracy", "h_rich_vs_h_poor_accuracy", "macro_f1", "ia_purity_at_90_completeness")
    rows = ["| set | n | predictor | Ia vs non-Ia | H-rich vs H-poor | macro-F1 | Ia purity @90% | z NMAD "
            "| z outliers |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in report["sets"].items():
        for pred, label in (("model", "SpectraNet"), ("model_refined", "+ templates (shipped)"),
                            ("baseline", "template matcher"), ("stacked", "stacker (not shipped)")):
            if pred not in s:
                continue
            m = s[pred]
            rows.append(f"| {name} | {s['n']} | {label} | " + " | ".join(_fmt(m[k]) for k in keys)
                        + f" | {m['redshift']['nmad']:.4f} | {m['redshift']['outlier_fraction']:.3f} |")
    return "\n".join(rows)


def ood_table(summary: dict[str, Any]) -> str:
    o = summary.get("out_of_distribution")
    if not o:
        return ""
    return "\n".join(["| out-of-distribution flag | target | measured |", "|---|---|---:|",
                      f"| real non-transients flagged (M dwarfs, galaxies, AGN; n = {o['n_non_transients']}; "
                      f"{o.get('non_transients_flagged_how', 'shipped score')}) "
                      f"| >= 0.90 | {o['non_transients_flagged']:.3f} |",
                      f"| in-taxonomy validation spectra flagged (cross-fitted threshold) | <= 0.05 | "
                      f"{o['in_taxonomy_flagged']:.3f} |"]
                     + ([f"| real SEDM validation spectra flagged (in taxonomy, shipped threshold) | <= 0.05 | "
                         f"{o['real_sedm_flagged']:.3f} |"] if "real_sedm_flagged" in o else []))


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
    print(decisions_table(report["summary"]), "\n")
    print(sets_table(report), "\n")
    print(ood_table(report["summary"]), "\n")
    for name, s in report["sets"].items():
        print(f"**{name}** (n = {s['n']})\n")
        print(per_class_table(s["model_refined"], s.get("baseline")), "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
