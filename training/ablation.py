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
import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from spectranet.streamer.errors import PreprocessError
from spectranet.streamer.science.model import PRESETS, SpectraNet, count_parameters
from spectranet.streamer.science.preprocess import Grid, PreprocessConfig
from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.training.data import Spectrum
from spectranet.training.losses import class_balanced_weights, focal_loss, gaussian_nll, lr_at
from spectranet.training.simulate import SEDM_DEFAULT, Simulated, simulate_sedm, to_model_input
from spectranet.training.train import (
    TrainConfig,
    batch_keys,
    ema_update,
    load_split,
    parse_overrides,
    predict,
    schedule_step,
    val_metrics,
)

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
    pooling: str = "max"
    norm: str = "layer"
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


class SharedDraws(torch.utils.data.Dataset):
    """Item (epoch, i): one simulated SEDM observation of spectrum i, prepared once per input in ``inputs``."""

    def __init__(self, spectra: list[Spectrum], galaxies: list, inputs: dict[str, PreprocessConfig],
                 seed: int) -> None:
        self.spectra, self.galaxies, self.inputs, self.seed = spectra, galaxies, inputs, seed
        self.targets = np.array([CLASSES.index(s.label) for s in spectra])

    def __len__(self) -> int:
        return len(self.spectra)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict[str, torch.Tensor], int, float]:
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        for k in range(len(self.spectra)):  # a spectrum that no input can use yields the next one of its class
            j = (i + k) % len(self.spectra)
            if self.targets[j] != self.targets[i]:
                continue
            for _ in range(8):  # a draw that some input cannot use (too few pixels) is drawn again
                sim = simulate_sedm(self.spectra[j], self.galaxies, rng)
                if sim is None:
                    continue
                try:
                    x = {name: torch.from_numpy(_prepare(sim, c)) for name, c in self.inputs.items()}
                except PreprocessError:
                    continue
                return x, int(self.targets[j]), sim.z
        raise PreprocessError(f"no spectrum of class {CLASSES[self.targets[i]]} can be simulated", field="flux")


def _prepare(sim: Simulated, cfg: PreprocessConfig, z: float | None = None) -> np.ndarray:
    """[2, n_bins] of one input; a rest-frame input uses ``z`` (default: the true z of the draw)."""
    if not cfg.to_rest_frame:
        return to_model_input(sim.wave, sim.flux, sim.flux_err, cfg)
    shift = sim.z if z is None else z
    return to_model_input(sim.wave / (1.0 + shift), sim.flux, sim.flux_err, replace(cfg, to_rest_frame=False))


def _validation_draws(spectra: list[Spectrum], galaxies: list, inputs: dict[str, PreprocessConfig], seed: int):
    """The fixed validation set: raw draws (kept to re-prepare at a predicted z), inputs, labels, redshifts."""
    sims, xs, ys = [], {k: [] for k in inputs}, []
    for i, s in enumerate(spectra):
        rng = np.random.default_rng([seed, 0, i])
        for _ in range(32):
            sim = simulate_sedm(s, galaxies, rng)
            if sim is None:
                continue
            try:
                prepared = {k: _prepare(sim, c) for k, c in inputs.items()}
            except PreprocessError:
                continue
            sims.append(sim), ys.append(CLASSES.index(s.label))
            for k in inputs:
                xs[k].append(prepared[k])
            break
    return sims, {k: np.stack(v) for k, v in xs.items()}, np.array(ys), np.array([s.z for s in sims])


class _Member:
    """A network in training: weights, EMA copy, optimiser, and which losses it takes."""

    def __init__(self, variant: Variant, input_key: str, device: torch.device, cfg: TrainConfig, *,
                 classify: bool, redshift: bool) -> None:
        self.input_key, self.classify, self.redshift = input_key, classify, redshift
        self.lr_scale = variant.lr_scale
        self.model = SpectraNet(replace(PRESETS[cfg.preset], pooling=variant.pooling, norm=variant.norm)).to(device)
        self.ema = copy.deepcopy(self.model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, weights: torch.Tensor, lr: float,
             cfg: TrainConfig) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.lr_scale
        self.model.train()
        # common random numbers: every network draws the same dropout masks at a given step
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                out = self.model(x)
        loss = torch.zeros((), device=x.device)
        if self.classify:
            loss = loss + focal_loss(out.logits.float(), y, weights, cfg.focal_gamma)
        if self.redshift:
            loss = loss + cfg.z_weight * gaussian_nll(out.z_mean.float(), out.z_logvar.float(), z)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            self.optimizer.step()
            ema_update(self.ema, self.model, cfg.ema_decay)
        return float(loss.item())


def _evaluate(variant: Variant, members: list[_Member], sims: list[Simulated], x_val: dict[str, np.ndarray],
              y_val: np.ndarray, z_val: np.ndarray, rest: PreprocessConfig, device: torch.device) -> dict:
    first = predict(members[0].ema, x_val[members[0].input_key], device)
    if not variant.two_networks:
        return val_metrics(first, y_val, z_val)
    # the classifier sees each validation draw de-redshifted by the redshift network's own estimate
    x_rest = np.stack([_prepare(s, rest, float(z)) for s, z in zip(sims, first["z"])])
    second = predict(members[1].ema, x_rest, device)
    return val_metrics({"logits": second["logits"], "z": first["z"], "z_err": first["z_err"]}, y_val, z_val)


def run_ablation(cfg: TrainConfig, variants: tuple[Variant, ...] = VARIANTS) -> dict:
    """Train every variant on the same batches for ``cfg.max_steps`` (or ``cfg.time_limit_min``); rank them."""
    t_start = time.time()
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(cfg.threads)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: pick the fastest kernels once
    torch.manual_seed(cfg.seed)
    train_spectra, val_spectra, galaxies, summary = load_split(cfg)
    configs = input_configs(PRESETS[cfg.preset].n_bins)
    needed = {v.input for v in variants} | ({"rest-continuum"} if any(v.two_networks for v in variants) else set())
    inputs = {k: configs[k] for k in sorted(needed)}
    sims, x_val, y_val, z_val = _validation_draws(val_spectra, galaxies, inputs, cfg.val_seed)
    dataset = SharedDraws(train_spectra, galaxies, inputs, cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_keys(len(dataset), cfg.batch_size, cfg.seed, 0),
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=lambda _: torch.set_num_threads(1))
    counts = np.bincount(dataset.targets, minlength=len(CLASSES))
    weights = class_balanced_weights(counts.tolist(), cfg.cb_beta).to(device)

    teams: dict[str, list[_Member]] = {}
    for v in variants:
        torch.manual_seed(cfg.seed)  # every variant starts from the same seed: identical variants train identically
        if v.two_networks:
            teams[v.name] = [_Member(v, v.input, device, cfg, classify=False, redshift=True),
                             _Member(v, "rest-continuum", device, cfg, classify=True, redshift=False)]
        else:
            teams[v.name] = [_Member(v, v.input, device, cfg, classify=True, redshift=True)]
    print(f"ablation on {device}: {len(train_spectra)} train spectra, {len(y_val)} validation draws, "
          f"variants {[v.name for v in variants]}", flush=True)

    history: dict[str, list[dict]] = {v.name: [] for v in variants}
    step, batches = 0, iter(loader)
    while step < cfg.max_steps:
        lr = lr_at(schedule_step(step, time.time() - t_start, cfg), base_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                   max_steps=cfg.max_steps)
        xb, y, z = next(batches)                          # xb: {input: [B, 2, n_bins]}, y: [B], z: [B]
        xb = {k: v.to(device, non_blocking=True) for k, v in xb.items()}
        y, z = y.to(device), z.to(device, torch.float32)
        losses = {name: sum(m.step(step, xb[m.input_key], y, z, weights, lr, cfg) for m in team)
                  for name, team in teams.items()}
        step += 1
        out_of_time = cfg.time_limit_min > 0 and time.time() - t_start > 60 * cfg.time_limit_min
        if step % cfg.eval_every == 0 or step >= cfg.max_steps or out_of_time:
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
        if out_of_time:
            break

    # rank by the best validation macro-F1 each variant reached (what early stopping would export)
    results = []
    for v in variants:
        best = max(history[v.name], key=lambda h: h["val_macro_f1"])
        results.append({"variant": asdict(v), "best": best, "last": history[v.name][-1],
                        "parameters": sum(count_parameters(m.model) for m in teams[v.name]),
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
    input to the rest frame of its own redshift on the log grid (``spectranet.streamer.science.model.rest_frame_view``) instead of
    preprocessing the spectrum again at that redshift as this ablation does; the shipped model's own validation
    numbers measure that implementation.
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
    report = run_ablation(TrainConfig.from_yaml(args.config, **parse_overrides(args.set)), chosen)
    if args.write_overrides:
        args.write_overrides.write_text("".join(f"{k}={v}\n" for k, v in winner_overrides(report).items()))
    for r in report["results"]:
        b = r["best"]
        print(f"{r['variant']['name']:32s} best macro-F1 {b['val_macro_f1']:.3f} at step {b['step']}, "
              f"Ia {b['val_ia']:.3f}, H-rich/poor {b['val_h_rich_poor']:.3f}, z RMS {b['val_z_rms']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
