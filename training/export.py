"""Export a checkpoint that streamer loads into the package (``streamer/models``).

``python -m spectranet.training.export --from runs/default/spectranet-sedm-0.2.0 [--evaluation runs/eval/metrics.json]``
ships a trained run's checkpoint, optionally recording the evaluation summary (SpectraNet vs the baseline) in its card.
``python -m spectranet.training.export --untrained`` writes the placeholder model: the real architecture and
preprocessing with seeded random weights, so that the whole pipeline runs before a trained model exists; its card says
``"trained": false`` and its predictions mean nothing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from spectranet.streamer.science.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, save_derived
from spectranet.streamer.science.model import PRESETS, SpectraNet
from spectranet.streamer.science.preprocess import PreprocessConfig
from spectranet.streamer.science.taxonomy import CLASSES, TAXONOMY_VERSION

__all__ = ["export_untrained", "export_trained"]


def export_untrained(out_dir: Path, *, preset: str = "default", seed: int = 0, version: str = "0.0.1") -> Checkpoint:
    torch.manual_seed(seed)
    config = PRESETS[preset]
    model = SpectraNet(config)
    preprocess = PreprocessConfig(grid=replace(PreprocessConfig().grid, n_bins=config.n_bins))
    name = "spectranet-sedm"
    return save_checkpoint(model, out_dir / f"{name}-{version}", name=name, version=version, taxonomy=CLASSES,
                           preprocess=preprocess,
                           extra={"trained": False, "preset": preset, "seed": seed,
                                  "taxonomy_version": TAXONOMY_VERSION,
                                  "note": "untrained placeholder: real architecture, random weights"})


def export_trained(run_checkpoint: Path, out_dir: Path, *, evaluation: Path | None = None) -> Checkpoint:
    """Re-save a verified run checkpoint into ``out_dir`` with the evaluation summary added to its card."""
    ckpt = load_checkpoint(run_checkpoint)
    extra = dict(ckpt.extra)
    if evaluation is not None:
        report = json.loads(Path(evaluation).read_text())
        extra["evaluation"] = {"summary": report["summary"], "baseline": report.get("baseline"),
                               "sets": {name: {"n": s["n"], "model": _short(s["model"]),
                                               **({"model_refined": _short(s["model_refined"])}
                                                  if "model_refined" in s else {}),
                                               **({"baseline": _short(s["baseline"])} if "baseline" in s else {})}
                                        for name, s in report["sets"].items()}}
    return save_derived(ckpt, ckpt.build_model(), out_dir, extra=extra)


def _short(report: dict) -> dict:
    keep = ("accuracy", "macro_f1", "ia_vs_non_ia_accuracy", "h_rich_vs_h_poor_accuracy",
            "ia_purity_at_90_completeness", "ece", "redshift", "per_class")
    return {k: report[k] for k in keep if k in report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--untrained", action="store_true")
    what.add_argument("--from", dest="source", type=Path, help="a trained run's checkpoint (path without suffix)")
    ap.add_argument("--evaluation", type=Path, help="metrics.json from spectranet evaluate, recorded in the card")
    ap.add_argument("--out", type=Path, default=Path("streamer/models"))
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.untrained:
        ckpt = export_untrained(args.out, preset=args.preset, seed=args.seed)
    else:
        ckpt = export_trained(args.source, args.out, evaluation=args.evaluation)
    print(f"wrote {args.out}/{ckpt.name}-{ckpt.version}.safetensors sha256={ckpt.weights_sha256}")


if __name__ == "__main__":
    main()
