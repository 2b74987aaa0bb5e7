"""``spectranet train`` and ``spectranet evaluate``: registered on the main command by ``spectranet.streamer.cli``."""

from __future__ import annotations

import argparse

__all__ = ["add_subcommands", "main"]


def add_subcommands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the training subcommands to the ``spectranet`` parser (imports stay lazy: the daemon never loads them)."""
    p = sub.add_parser("train", help="train SpectraNet on simulated SEDM spectra (training/configs/*.yaml)")
    p.add_argument("--config", required=True, help="YAML training config, e.g. training/configs/default.yaml")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. --set max_steps=100")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("pack",
                       help="save a config's train/validation split as one .npz (spectra_pack) for another host")
    p.add_argument("--config", required=True, help="YAML training config whose manifest and split to pack")
    p.add_argument("--out", required=True, help="output .npz")
    p.set_defaults(func=_cmd_pack)

    p = sub.add_parser("evaluate", help="metrics and figures of a model against the template-matching baseline")
    p.add_argument("--model", default=None, help="checkpoint path (default: the shipped model)")
    p.add_argument("--manifest", default=None,
                   help="CSV of your own spectra (path, type, redshift[, phase]); default: the validation split "
                        "of the shared data, simulated at SEDM resolution")
    p.add_argument("--data-manifest", default="../shared/data/manifest.csv",
                   help="the shared-data manifest (validation split and the baseline's templates)")
    p.add_argument("--out", default="runs/evaluate", help="folder for metrics.json and the PNG figures")
    p.add_argument("--no-baseline", action="store_true", help="skip the cross-correlation template baseline")
    p.add_argument("--max-templates", type=int, default=600, help="baseline templates (seeded subsample)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_train(args: argparse.Namespace) -> int:
    from spectranet.training.train import TrainConfig, parse_overrides, train

    train(TrainConfig.from_yaml(args.config, **parse_overrides(args.set)))
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from spectranet.training.data import save_pack
    from spectranet.training.train import TrainConfig, load_split

    train, val, galaxies, summary = load_split(TrainConfig.from_yaml(args.config))
    save_pack(args.out, train=train, val=val, galaxies=galaxies, summary=summary)
    print(f"{args.out}: {len(train)} train and {len(val)} validation spectra, {len(galaxies)} galaxy templates")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from spectranet.training.evaluate import evaluate

    report = evaluate(model=args.model, manifest=args.manifest, data_manifest=args.data_manifest, out_dir=args.out,
                      baseline=not args.no_baseline, max_templates=args.max_templates)
    print(json.dumps(report["summary"], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``spectranet-train {train,pack,evaluate} ...``: the training commands without the daemon's CLI."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="spectranet-train", description=__doc__.splitlines()[0])
    add_subcommands(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
