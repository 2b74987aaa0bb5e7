"""Put further redshift networks beside a two-network checkpoint (``ModelConfig.redshift_members``), and set its
classifier's test-time views (``ModelConfig.classifier_views``).

``python -m spectranet.training.ensemble --base runs/v060-cal/spectranet-sedm-0.6.0 --redshift-from
runs/v050-cal/spectranet-sedm-0.5.0 --version 0.7.0 --out runs/v070`` writes a checkpoint with the base's classifier
and redshift network, plus the observed-frame redshift network of each ``--redshift-from`` checkpoint; the model
combines their redshifts by inverse variance (``spectranet.streamer.science.model.combine_redshifts``) and classifies
the rest frame of the combination. ``--classifier-views -0.02 0.02`` makes the classifier's logits the mean over
rest-frame views at ln(1 + z) -/+ 0.02 (one classifier pass per view). ``--sedm-input-bins`` makes the network read
only the input bins the SEDM training simulation covers (``ModelConfig.input_bins``; what ``train`` sets on new
models). ``--weights runs/v091/snapshots/step-007368.pt`` takes the base's weights from a snapshot of its own
training run (``keep_snapshots``) instead of the exported best step. Nothing is retrained: calibrate the result
again (``spectranet.training.calibrate``), since its final logits differ from the base's.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from spectranet.streamer.errors import ConfigError
from spectranet.streamer.science.checkpoint import Checkpoint, load_checkpoint, save_derived
from spectranet.streamer.science.model import SpectraNet
from spectranet.training.simulate import sedm_input_bins

__all__ = ["add_redshift_members"]


def add_redshift_members(base: str | Path, members: list[str | Path], out_dir: str | Path, *,
                         version: str, classifier_views: tuple[float, ...] | None = None,
                         sedm_input_bins_only: bool = False, weights: str | Path | None = None) -> Checkpoint:
    """The checkpoint ``out_dir/<name>-<version>``: ``base`` with the redshift networks of ``members`` added,
    ``classifier_views`` (when given) as its classifier's test-time views, and with ``sedm_input_bins_only`` reading
    only the input bins the SEDM simulation covers; ``weights``: a snapshot of the base's run (``snapshots/step-N.pt``,
    the same parameters) whose weights replace the base's own."""
    start = load_checkpoint(base)
    cfg = start.model_config
    if not cfg.two_networks:
        raise ConfigError(f"{base}: redshift members need a two-network model")
    donors = [load_checkpoint(m) for m in members]
    for path, donor in zip(members, donors):
        if replace(donor.model_config, redshift_members=1, classifier_views=(), input_bins=()) != \
                replace(cfg, redshift_members=1, classifier_views=(), input_bins=()):
            raise ConfigError(f"{path}: its architecture {donor.model_config} is not the base's {cfg}")
        if donor.preprocess != start.preprocess:
            raise ConfigError(f"{path}: its preprocessing differs from the base's")
    views = cfg.classifier_views if classifier_views is None else tuple(classifier_views)
    bins = sedm_input_bins(start.preprocess.grid) if sedm_input_bins_only else cfg.input_bins
    model = SpectraNet(replace(cfg, redshift_members=cfg.redshift_members + len(donors), classifier_views=views,
                               input_bins=bins))
    state = dict(start.state_dict)
    extra = dict(start.extra)
    if weights is not None:
        snapshot = torch.load(weights, map_location="cpu", weights_only=True)
        if set(snapshot) != set(state) or any(snapshot[k].shape != state[k].shape for k in state):
            raise ConfigError(f"{weights}: not a snapshot of {base}'s architecture")
        state = {k: snapshot[k].to(state[k].dtype) for k in state}
        extra["weights_from_snapshot"] = Path(weights).name
    first_new = cfg.redshift_members - 1  # index of the first added member in model.z_members
    for k, donor in enumerate(donors):
        own = donor.state_dict  # its observed-frame redshift network: everything but its classifier and members
        for key, tensor in own.items():
            if not key.startswith(("rest_net.", "z_members.")):
                state[f"z_members.{first_new + k}.{key}"] = tensor
    model.load_state_dict(state, strict=True)
    extra = {**extra, "redshift_members": [
        {"name": d.name, "version": d.version, "weights_sha256": d.weights_sha256} for d in donors]}
    return save_derived(start, model, out_dir, version=version, extra=extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="two-network checkpoint (path without suffix)")
    ap.add_argument("--redshift-from", nargs="*", default=[], help="checkpoints whose redshift networks to add")
    ap.add_argument("--classifier-views", nargs="+", type=float, help="offsets in ln(1 + z) of the classifier's "
                    "test-time views (default: the base's)")
    ap.add_argument("--sedm-input-bins", action="store_true", help="read only the input bins the SEDM training "
                    "simulation covers (default: the base's)")
    ap.add_argument("--weights", type=Path, help="a snapshot of the base's training run (snapshots/step-N.pt) whose "
                    "weights to use instead of the base's")
    ap.add_argument("--version", required=True, help="version of the written checkpoint")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    views = None if args.classifier_views is None else tuple(args.classifier_views)
    ckpt = add_redshift_members(args.base, args.redshift_from, args.out, version=args.version, classifier_views=views,
                                sedm_input_bins_only=args.sedm_input_bins, weights=args.weights)
    print(f"wrote {args.out}/{ckpt.name}-{ckpt.version}.safetensors: {ckpt.model_config.redshift_members} redshift "
          f"networks, classifier views {ckpt.model_config.classifier_views or (0.0,)}, input bins "
          f"{ckpt.model_config.input_bins or 'all'}, sha256={ckpt.weights_sha256}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
