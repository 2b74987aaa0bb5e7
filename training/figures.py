"""Figures for the model card: simulated SEDM spectra next to a real one, and the evaluation plots.

Small PNGs (matplotlib Agg, ~80 dpi) so that they can live in the package next to the model card.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from spectranet.training import metrics as M  # noqa: E402

__all__ = ["plot_confusion", "plot_redshift", "plot_pr", "plot_reliability", "plot_simulated", "simulation_figure"]

_DPI = 80


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix with counts."""
    cm = np.asarray(cm, float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised colour, counts)")
    return _save(fig, path)


def plot_redshift(z_true: np.ndarray, preds: dict[str, np.ndarray], path: Path) -> Path:
    """Predicted vs true redshift for each predictor (model, baseline)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    top = float(max(np.max(z_true), *(np.max(p) for p in preds.values()))) * 1.05 if len(z_true) else 1.0
    for (name, zp), marker in zip(preds.items(), ("o", "x")):
        ax.scatter(z_true, zp, s=6, alpha=0.5, marker=marker, label=name)
    ax.plot([0, top], [0, top], "k-", lw=0.8)
    t = np.linspace(0, top, 50)
    ax.plot(t, t + 0.15 * (1 + t), "k:", lw=0.8)
    ax.plot(t, t - 0.15 * (1 + t), "k:", lw=0.8, label="|dz| = 0.15 (1+z)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("true z")
    ax.set_ylabel("predicted z")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_pr(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """One-vs-rest precision-recall curve per class, average precision in the legend."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, c in enumerate(classes):
        pos = np.asarray(y_true) == i
        if not pos.any():
            continue
        precision, recall, ap = M.precision_recall_curve(probs[:, i], pos)
        ax.plot(np.r_[0, recall], np.r_[precision[0], precision], lw=1.2, label=f"{c} (AP {ap:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_reliability(probs_before: np.ndarray, probs_after: np.ndarray, y_true: np.ndarray, path: Path) -> Path:
    """Reliability diagram of the top-class confidence before and after temperature scaling."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k-", lw=0.8)
    for name, p in (("T = 1", probs_before), ("temperature scaled", probs_after)):
        b = M.reliability_bins(p, y_true)
        ok = b["count"] > 0
        ece = M.expected_calibration_error(p, y_true)
        ax.plot(b["confidence"][ok], b["accuracy"][ok], "o-", ms=3, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_purity_completeness(scores: np.ndarray, positive: np.ndarray, path: Path, title: str = "") -> Path:
    """Purity and completeness of the positive class against the threshold on its score."""
    order = np.argsort(-np.asarray(scores))
    pos = np.asarray(positive, bool)[order]
    tp = np.cumsum(pos)
    purity = tp / np.arange(1, pos.size + 1)
    completeness = tp / max(1, pos.sum())
    thresholds = np.asarray(scores)[order]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(thresholds, purity, label="purity")
    ax.plot(thresholds, completeness, label="completeness")
    ax.set_xlabel("threshold on p(class)")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_simulated(real: tuple[np.ndarray, np.ndarray], real_title: str,
                   simulated: Sequence[tuple[np.ndarray, np.ndarray, str]], path: Path) -> Path:
    """A real SEDM spectrum (top) above simulated ones, each scaled to median 1 and offset."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [1, 2.5]})
    w, f = real
    axes[0].plot(w, f / np.median(f), "k-", lw=1)
    axes[0].set_title(real_title, fontsize=9)
    for k, (w, f, label) in enumerate(simulated):
        axes[1].plot(w, f / np.median(np.abs(f)) + 2.0 * k, lw=0.9)
        axes[1].text(w[-1] + 30, 2.0 * k + 1, label, fontsize=7, va="center")
    axes[1].set_xlabel("observed wavelength (A)")
    axes[1].set_ylabel("flux / median + offset")
    axes[1].set_title("simulated SEDM spectra (R~100, 25.6 A pixels, noise, host, tilt, telluric)", fontsize=9)
    axes[1].set_xlim(3500, 10200)
    return _save(fig, path)


def simulation_figure(manifest: Path, out: Path, *, seed: int = 3) -> Path:
    """Simulated SEDM spectra of five classes next to the real SEDM spectrum of SN 2019dwa (SLSN-I, z = 0.082)."""
    from spectranet.streamer.contract.readers import read_spectrum
    from spectranet.training.data import load_galaxies, load_spectra, read_manifest
    from spectranet.training.simulate import simulate_sedm

    entries = read_manifest(manifest)
    spectra, _ = load_spectra(entries)
    galaxies = load_galaxies(entries)
    real = read_spectrum(Path(manifest).parent / "spectra/slsne/2019dwa_TNS_ZTF_SEDM_2019.0514.txt")
    rng = np.random.default_rng(seed)
    simulated = []
    for label in ("SLSN-I", "Ia", "II", "Ic-BL", "TDE"):
        pool = [s for s in spectra if s.label == label and s.object_id != "2019dwa"]
        spec = pool[int(rng.integers(len(pool)))]
        sim = simulate_sedm(spec, galaxies, rng, z=0.082 if label == "SLSN-I" else None)
        if sim is not None:
            simulated.append((sim.wave, sim.flux, f"{label} z={sim.z:.3f}\n{Path(spec.path).name[:20]}"))
    return plot_simulated((np.asarray(real.wavelength), np.asarray(real.flux)),
                          "real SEDM: SN 2019dwa (SLSN-I, z = 0.082)", simulated, out)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="the simulated-vs-real SEDM figure of the model card")
    ap.add_argument("--manifest", type=Path, default=Path("../shared/data/manifest.csv"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    print(simulation_figure(args.manifest, args.out))
