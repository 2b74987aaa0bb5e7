"""Export a checkpoint that streamer loads; ``python -m training.export --untrained`` writes the placeholder model.

The placeholder has the real architecture and preprocessing with seeded random weights, so the whole pipeline
runs before a trained model exists. Its card says ``"trained": false`` and its predictions mean nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from streamer.checkpoint import Checkpoint, save_checkpoint
from streamer.model import PRESETS, SpectraNet
from streamer.preprocess import Grid, PreprocessConfig
from streamer.taxonomy import CLASSES, TAXONOMY_VERSION

__all__ = ["export_untrained"]


def export_untrained(out_dir: Path, *, preset: str = "default", seed: int = 0, version: str = "0.0.1") -> Checkpoint:
    torch.manual_seed(seed)
    config = PRESETS[preset]
    model = SpectraNet(config)
    preprocess = PreprocessConfig(grid=Grid(3500.0, 10000.0, config.n_bins))
    name = "spectranet-sedm"
    return save_checkpoint(model, out_dir / f"{name}-{version}", name=name, version=version, taxonomy=CLASSES,
                           preprocess=preprocess,
                           extra={"trained": False, "preset": preset, "seed": seed,
                                  "taxonomy_version": TAXONOMY_VERSION,
                                  "note": "untrained placeholder: real architecture, random weights"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--untrained", action="store_true", required=True)
    ap.add_argument("--out", type=Path, default=Path("streamer/models"))
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ckpt = export_untrained(args.out, preset=args.preset, seed=args.seed)
    print(f"wrote {args.out}/{ckpt.name}-{ckpt.version}.safetensors sha256={ckpt.weights_sha256}")


if __name__ == "__main__":
    main()
