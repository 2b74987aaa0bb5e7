"""Compare model variants on identical simulated batches: ``python -m spectranet.training.ablation --config FILE``.

Issues 3 and 4 leave three design choices to validation: max-pooling or the reference's multi-scale pooling (max,
average and min concatenated); one multi-task network on observer-frame input, or the paper's two networks (a
redshift network on observer-frame input and a classifier on rest-frame input, given the true z in training and the
redshift network's z at validation); SNID-style continuum removal or a robust scale. A fourth is measured too:
the paper's channel-wise LayerNorm against BatchNorm, because the LayerNorm network stalls at learning rates that
BatchNorm takes. Every variant here trains for the same steps on the *same* batches (one simulated SEDM
observation feeds each variant's input), so differences between them are the variants', not the draws'. The
score is validation macro-F1 of the EMA weights, on the validation split simulated once with a fixed seed.
``spectranet.training.train`` then trains the winner.

Written to ``out_dir``: ``ablation.json`` (per variant: history, final validation metrics, parameters) and the
ranking on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from spectranet.streamer.errors import PreprocessError
from spectranet.streamer.science.model import PRESETS, SpectraNet, count_parameters
from spectranet.streamer.science.preprocess import Grid, PreprocessConfig
from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.training import loop
from spectranet.training.data import Spectrum
from spectranet.training.loop import SimulatedSet, TrainConfig, Trainee
from spectranet.training.simulate import SEDM_DEFAULT, Simulated, first_usable, to_model_input
from spectranet.training.train import load_split

__all__ = ["Variant", "VARIANTS", "input_configs", "run_ablation", "winner_overrides", "main"]

# The inputs a variant can read, each one ``prepare`` configuration of the same simulated observation (on the
# preset's grid). The rest-frame grid starts at 2500 A: SEDM's blue end (3777 A) at z = 0.5 lands at 2518 A.
def input_configs(n_bins: int) -> dict[str, PreprocessConfig]:
    observed = PreprocessConfig().grid  # streamer's default range, 3500-10000 A
    return {
        "observed-continuum": PreprocessConfig(grid=replace(observed, n_bins=n_bins), normalisation="continuum"),
        "observed-robust": PreprocessConfig(grid=replace(observed, n_bins=n_bins), normalisation="robust"),
        "rest-continuum": PreprocessConfig(grid=Grid(2500.0, 10000.0, n_bins), normalisation="continuum",
                                           to_rest_frame=True),
    }


@dataclass(frozen=True)
class Variant:
    """One design: pooling, input normalisation, and one network or the paper's two."""

    name: str
    pooling: Literal["max", "multiscale"] = "max"
    norm: Literal["layer", "batch"] = "layer"
    lr_scale: float = 1.0       # times the config's learning rate
    input: str = "observed-continuum"
    two_networks: bool = False  # True: a redshift network on ``input`` plus a classifier on rest-frame input


VARIANTS: tuple[Variant, ...] = (
    Variant("multitask-max-continuum"),
    Variant("multitask-multiscale-continuum", pooling="multiscale"),
    Variant("multitask-max-robust", input="observed-robust"),
    Variant("two-networks-max-continuum", two_networks=True),
    Variant("multitask-max-continuum-batchnorm", norm="batch"),
    Variant("multitask-max-continuum-batchnorm-lr3x", norm="batch", lr_scale=3.0),
)


class SharedDraws(SimulatedSet):
    """Item (epoch, i): one simulated SEDM observation of spectrum i, prepared once per input in ``inputs``
    (x: {input: [2, n_bins]}); a draw that some input cannot use is drawn again."""

    def __init__(self, spectra: list[Spectrum], galaxies: list, inputs: dict[str, PreprocessConfig],
                 seed: int) -> None:
        super().__init__(spectra, galaxies, seed)
        self.inputs = inputs

    def draw(self, spectrum: Spectrum, rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], float]:
        def every_input(sim: Simulated) -> tuple[dict[str, torch.Tensor], float]:
            return {name: torch.from_numpy(_prepare(sim, c)) for name, c in self.inputs.items()}, sim.z

        return first_usable(spectrum, self.galaxies, rng, every_input, tries=8)


def _prepare(sim: Simulated, cfg: PreprocessConfig, z: float | None = None) -> np.ndarray:
    """[2, n_bins] of one input; a rest-frame input uses ``z`` (default: the true z of the draw)."""
    if not cfg.to_rest_frame:
        return to_model_input(sim.wave, sim.flux, sim.flux_err, cfg)
    shift = sim.z if z is None else z
    return to_model_input(sim.wave / (1.0 + shift), sim.flux, sim.flux_err, replace(cfg, to_rest_frame=False))


def _validation_draws(spectra: list[Spectrum], galaxies: list, inputs: dict[str, PreprocessConfig], seed: int):
    """The fixed validation set: raw draws (kept to re-prepare at a predicted z), inputs, labels, redshifts."""
    sims: list[Simulated] = []
    xs: dict[str, list[np.ndarray]] = {k: [] for k in inputs}
    ys: list[int] = []

    def every_input(sim: Simulated) -> tuple[Simulated, dict[str, np.ndarray]]:
        return sim, {k: _prepare(sim, c) for k, c in inputs.items()}

    for i, s in enumerate(spectra):
        try:
            sim, prepared = first_usable(s, galaxies, np.random.default_rng([seed, 0, i]), every_input, tries=32)
        except PreprocessError:
            continue  # no usable draw in 32: not part of the set (the same ones every time)
        sims.append(sim)
        ys.append(CLASSES.index(s.label))
        for k in inputs:
            xs[k].append(prepared[k])
    return sims, {k: np.stack(v) for k, v in xs.items()}, np.array(ys), np.array([s.z for s in sims])


@dataclass
class _Member:
    """A network of a variant: what it trains, which input it reads, and its learning-rate factor."""

    trainee: Trainee
    input_key: str
    lr_scale: float


def _member(variant: Variant, input_key: str, device: torch.device, cfg: TrainConfig, *, classify: bool,
            redshift: bool) -> _Member:
    model = SpectraNet(replace(PRESETS[cfg.preset], pooling=variant.pooling, norm=variant.norm)).to(device)
    return _Member(Trainee.create(model, cfg, classify=classify, redshift=redshift), input_key, variant.lr_scale)


def _evaluate(variant: Variant, members: list[_Member], sims: list[Simulated], x_val: dict[str, np.ndarray],
              y_val: np.ndarray, z_val: np.ndarray, rest: PreprocessConfig, device: torch.device) -> dict:
    first = loop.predict(members[0].trainee.ema, x_val[members[0].input_key], device)
    if not variant.two_networks:
        return loop.val_metrics(first, y_val, z_val)
    # the classifier sees each validation draw de-redshifted by the redshift network's own estimate
    x_rest = np.stack([_prepare(s, rest, float(z)) for s, z in zip(sims, first["z"])])
    second = loop.predict(members[1].trainee.ema, x_rest, device)
    return loop.val_metrics({"logits": second["logits"], "z": first["z"], "z_err": first["z_err"]}, y_val, z_val)


def run_ablation(cfg: TrainConfig, variants: tuple[Variant, ...] = VARIANTS) -> dict:
    """Train every variant on the same batches for ``cfg.max_steps`` (or ``cfg.time_limit_min``); rank them."""
    t_start = time.time()
    device = loop.pick_device(cfg)
    train_spectra, val_spectra, galaxies, summary = load_split(cfg)
    configs = input_configs(PRESETS[cfg.preset].n_bins)
    needed = {v.input for v in variants} | ({"rest-continuum"} if any(v.two_networks for v in variants) else set())
    inputs = {k: configs[k] for k in sorted(needed)}
    sims, x_val, y_val, z_val = _validation_draws(val_spectra, galaxies, inputs, cfg.val_seed)
    dataset = SharedDraws(train_spectra, galaxies, inputs, cfg.seed)
    batch_iter = loop.batches(dataset, cfg, device)
    weights = loop.class_weights(dataset, cfg, device)

    teams: dict[str, list[_Member]] = {}
    for v in variants:
        torch.manual_seed(cfg.seed)  # every variant starts from the same seed: identical variants train identically
        if v.two_networks:
            teams[v.name] = [_member(v, v.input, device, cfg, classify=False, redshift=True),
                             _member(v, "rest-continuum", device, cfg, classify=True, redshift=False)]
        else:
            teams[v.name] = [_member(v, v.input, device, cfg, classify=True, redshift=True)]
    print(f"ablation on {device}: {len(train_spectra)} train spectra, {len(y_val)} validation draws, "
          f"variants {[v.name for v in variants]}", flush=True)

    history: dict[str, list[dict]] = {v.name: [] for v in variants}
    step = 0
    while step < cfg.max_steps:
        lr = loop.learning_rate(step, time.time() - t_start, cfg)
        xb, y, z = next(batch_iter)                       # xb: {input: [B, 2, n_bins]}, y: [B], z: [B]
        xb = {k: v.to(device, non_blocking=True) for k, v in xb.items()}
        y, z = y.to(device), z.to(device, torch.float32)
        # common random numbers: every network draws the same dropout masks at a given step
        dropout_seed = cfg.seed * 1_000_003 + step
        losses = {name: sum(loop.train_step(m.trainee, xb[m.input_key], y, z, lr=lr * m.lr_scale, weights=weights,
                                       cfg=cfg, dropout_seed=dropout_seed).loss for m in team)
                  for name, team in teams.items()}
        step += 1
        no_time_left = loop.out_of_time(time.time() - t_start, cfg)
        if step % cfg.eval_every == 0 or step >= cfg.max_steps or no_time_left:
            for v in variants:
                m = _evaluate(v, teams[v.name], sims, x_val, y_val, z_val, configs["rest-continuum"], device)
                history[v.name].append({"step": step, "loss": round(losses[v.name], 4),
                                        "val_macro_f1": m["macro_f1"], "val_accuracy": m["accuracy"],
                                        "val_ia": m["ia_vs_non_ia_accuracy"],
                                        "val_h_rich_poor": m["h_rich_vs_h_poor_accuracy"],
                                        "val_z_rms": m["redshift"]["rms"],
                                        "val_z_outliers": m["redshift"]["outlier_fraction"]})
            print(json.dumps({"step": step, "elapsed_s": round(time.time() - t_start, 1),
                              **{n: round(h[-1]["val_macro_f1"], 4) for n, h in history.items()}}), flush=True)
        if no_time_left:
            break

    # rank by the best validation macro-F1 each variant reached (what early stopping would export)
    results: list[dict[str, Any]] = []
    for v in variants:
        best = max(history[v.name], key=lambda h: h["val_macro_f1"])
        results.append({"variant": asdict(v), "best": best, "last": history[v.name][-1],
                        "parameters": sum(count_parameters(m.trainee.model) for m in teams[v.name]),
                        "history": history[v.name]})
    results.sort(key=lambda r: -r["best"]["val_macro_f1"])
    report = {"steps": step, "batch_size": cfg.batch_size, "elapsed_s": round(time.time() - t_start, 1),
              "device": str(device), "train_config": asdict(cfg), "simulation": asdict(SEDM_DEFAULT),
              "n_validation_draws": int(len(y_val)), "ranking": [r["variant"]["name"] for r in results],
              "results": results}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    return report


def winner_overrides(report: dict) -> dict[str, Any]:
    """Training-config keys (``spectranet.training.train``) for the best-ranked variant.

    A two-network winner is trained as ``two_networks: true``: the daemon's model then shifts its observed-frame
    input to the rest frame of its own redshift on the log grid (``spectranet.streamer.science.model.rest_frame_view``)
    instead of preprocessing the spectrum again at that redshift as this ablation does; the shipped model's own
    validation numbers measure that implementation.
    """
    v = report["results"][0]["variant"]
    return {"pooling": v["pooling"], "norm": v["norm"], "normalisation": v["input"].split("-")[-1],
            "lr": report["train_config"]["lr"] * v["lr_scale"], "two_networks": v["two_networks"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train model variants on identical batches and rank them.")
    ap.add_argument("--config", required=True, type=Path, help="a training YAML (steps, lr, batch, data)")
    ap.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. --set max_steps=100")
    ap.add_argument("--variants", nargs="*", default=None, help=f"subset of {[v.name for v in VARIANTS]}")
    ap.add_argument("--write-overrides", type=Path, default=None,
                    help="write the winning single-network variant's keys here as key=value lines, for "
                         "spectranet train --set $(cat FILE)")
    args = ap.parse_args(argv)
    chosen = VARIANTS if not args.variants else tuple(v for v in VARIANTS if v.name in args.variants)
    report = run_ablation(TrainConfig.from_yaml(args.config, **loop.parse_overrides(args.set)), chosen)
    if args.write_overrides:
        args.write_overrides.write_text("".join(f"{k}={v}\n" for k, v in winner_overrides(report).items()))
    for r in report["results"]:
        b = r["best"]
        print(f"{r['variant']['name']:32s} best macro-F1 {b['val_macro_f1']:.3f} at step {b['step']}, "
              f"Ia {b['val_ia']:.3f}, H-rich/poor {b['val_h_rich_poor']:.3f}, z RMS {b['val_z_rms']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
