"""SpectraNet (arXiv:2510.07215): multi-scale 1-D convolutions over a spectrum, with class and redshift heads.

Each of five stages runs three same-padded convolutions with different kernel sizes in parallel (narrow lines and
broad P-Cygni features at once), concatenates them, normalises channel-wise (LayerNorm over channels at each
wavelength; BatchNorm as an ablation), applies GELU and mixes back to the stage width with a 1x1 convolution.
Stages are separated by max-pooling, or by "multi-scale pooling" (max, average and min concatenated; the
reference's earlier variant).
Global average+max pooling feeds an MLP trunk with two heads: class logits over the taxonomy and a Gaussian
redshift (mean and log-variance, trained with Gaussian NLL).

With ``two_networks`` (the paper's design, and the shipped model's since the ablation in MODEL_CARD.md) the network
above predicts only the redshift, and a second one classifies a rest-frame view of the same input: on a
log-wavelength grid a redshift is a shift by ln(1 + z) / step bins (``rest_frame_view``), so the daemon still runs
one module on one observed-frame tensor. Inference shifts by the predicted z; training by the true z, jittered, or
by the predicted one (``spectranet.training.train``'s ``z_noise`` and ``pred_z_fraction``).

``redshift_members`` > 1 (two networks only) adds further observed-frame redshift networks, trained apart and put
together afterwards (``spectranet.training.ensemble``): the redshift is their inverse-variance combination in
ln(1 + z) (``combine_redshifts``), and the classifier reads the rest frame of that. Measured for spectranet-sedm
0.7.0 (0.6.0 plus 0.5.0's redshift network) on the 1,935 real-degraded validation spectra: outliers 5.6% -> 5.0%,
refined NMAD 0.0074 -> 0.0072; the plain mean gave 5.2%, the lower of the two 5.0% with more outliers above z 0.2.

``classifier_views`` (two networks only; set on a trained checkpoint by ``spectranet.training.ensemble``) makes the
classifier's logits the mean over rest-frame views at ln(1 + z) + d, one classifier pass per view: a test-time average
over the redshift's uncertainty.

Presets are data (``PRESETS``); a checkpoint stores the ``ModelConfig`` that built it so loading rebuilds it exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "PRESETS", "DEFAULT_PRESET", "SpectraNet", "ModelOutput", "rest_frame_view",
           "combine_redshifts", "count_parameters", "count_flops"]


@dataclass(frozen=True)
class ModelConfig:
    n_bins: int = 1024                                   # input length (model wavelength grid)
    in_channels: int = 2                                 # normalised flux, coverage mask
    widths: tuple[int, ...] = (24, 48, 96, 160, 256)     # stage widths
    kernels: tuple[tuple[int, int, int], ...] = ((63, 31, 15), (31, 15, 7), (15, 9, 5), (9, 5, 3), (5, 3, 1))
    pooling: Literal["max", "multiscale"] = "max"
    norm: Literal["layer", "batch"] = "layer"            # channel-wise LayerNorm (the paper) or BatchNorm
    hidden: int = 256                                    # MLP trunk width
    dropout: float = 0.2
    n_classes: int = 9
    # The paper's two networks: this one predicts z from the observed frame and hands a rest-frame view of the input
    # (shifted on the log grid by its own z, or by the true z in training) to a classifier network of rest_bins bins.
    two_networks: bool = False
    log_step: float = 0.0                                # ln-wavelength step of the input grid (two_networks)
    rest_bins: int = 0                                   # rest-frame grid length, ending where the input's ends
    redshift_members: int = 1                            # observed-frame redshift networks combined (two_networks)
    # Test-time views (two_networks): the classifier's logits are the mean over rest-frame views at ln(1 + z) + d for
    # each offset d; () is the one view at z. Each view costs one classifier pass.
    classifier_views: tuple[float, ...] = ()
    # The input bins the network reads, (first, stop): both channels of the others are zeroed before it sees them
    # (the template refinement still sees them). Set to the bins the training simulation's SEDM pixels reach
    # (``spectranet.training.simulate.sedm_input_bins``), so that a spectrum covering more of the grid (real SEDM
    # reductions reach 3500-10000 A, the simulation 3737-9379 A) is shown to the network as it was trained. () reads
    # every bin (models before 0.8.3). Measured on 0.8.2 with real-degraded validation spectra given SEDM pixels over
    # the whole grid: Ia vs non-Ia 0.879 -> 0.890, macro-F1 0.423 -> 0.461, network z NMAD 0.0220 -> 0.0117.
    input_bins: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.kernels):
            raise ValueError(f"widths ({len(self.widths)}) and kernels ({len(self.kernels)}) "
                             "must have one entry per stage")
        if any(k % 2 == 0 for ks in self.kernels for k in ks):
            raise ValueError("kernel sizes must be odd so 'same' padding is symmetric")
        if self.pooling not in ("max", "multiscale"):
            raise ValueError(f"pooling must be 'max' or 'multiscale', got {self.pooling!r}")
        if self.norm not in ("layer", "batch"):
            raise ValueError(f"norm must be 'layer' or 'batch', got {self.norm!r}")
        if self.n_bins % (2 ** (len(self.widths) - 1)) != 0:
            raise ValueError(f"n_bins={self.n_bins} must be divisible by 2**(stages-1) for the pooling")
        if self.redshift_members < 1 or (self.redshift_members > 1 and not self.two_networks):
            raise ValueError(f"redshift_members={self.redshift_members}: 1, or more with two_networks")
        if self.classifier_views and not self.two_networks:
            raise ValueError("classifier_views need two_networks (a rest-frame classifier)")
        if self.input_bins and not (len(self.input_bins) == 2 and 0 <= self.input_bins[0] < self.input_bins[1]
                                    <= self.n_bins):
            raise ValueError(f"input_bins must be (first, stop) with 0 <= first < stop <= n_bins={self.n_bins}, "
                             f"got {self.input_bins!r}")
        if self.two_networks:
            if not self.log_step > 0:
                raise ValueError("two_networks needs the input grid's log_step (> 0)")
            if self.rest_bins < self.n_bins or self.rest_bins % (2 ** (len(self.widths) - 1)) != 0:
                raise ValueError(f"rest_bins={self.rest_bins} must be >= n_bins and divisible by 2**(stages-1)")

    @property
    def max_shift_z(self) -> float:
        """The largest redshift whose rest-frame view still starts inside the rest grid."""
        return math.expm1((self.rest_bins - self.n_bins) * self.log_step)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        d["kernels"] = tuple(tuple(k) for k in d["kernels"])
        d["classifier_views"] = tuple(d.get("classifier_views", ()))
        d["input_bins"] = tuple(d.get("input_bins", ()))
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # CPU-friendly and matched to SEDM: 256 log bins over 3500-10000 A are ~25 A each at 6000 A, one SEDM pixel, so
    # nothing SEDM records is lost while every convolution costs a quarter of the 1024-bin network's.
    "default": ModelConfig(n_bins=256, kernels=((15, 7, 3), (7, 5, 3), (5, 3, 1), (5, 3, 1), (3, 1, 1))),
    # The first default (spectranet-sedm 0.1.0): 1024 bins, four per SEDM pixel.
    "fine": ModelConfig(),
    # The paper's scale: 4096 bins, widths 64 -> 1024, very wide kernels early where channels are few.
    "paper": ModelConfig(
        n_bins=4096,
        widths=(64, 128, 256, 512, 1024),
        kernels=((1021, 511, 255), (255, 127, 63), (63, 31, 15), (15, 7, 5), (7, 5, 3)),
        hidden=1024,
    ),
}
DEFAULT_PRESET = "default"


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at each position of a [B, C, L] tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed: torch.Tensor = self.norm(x.transpose(1, 2))  # [B, L, C]
        return normed.transpose(1, 2)


class MultiScaleBlock(nn.Module):
    """Three parallel convolutions of different reach, concatenated, normalised, mixed back to ``width``."""

    def __init__(self, in_ch: int, width: int, kernels: tuple[int, int, int], norm: str = "layer") -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv1d(in_ch, width, k, padding=k // 2) for k in kernels)
        channels = width * len(kernels)
        self.norm = ChannelLayerNorm(channels) if norm == "layer" else nn.BatchNorm1d(channels)
        self.mix = nn.Conv1d(width * len(kernels), width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([b(x) for b in self.branches], dim=1)  # [B, 3W, L]
        mixed: torch.Tensor = self.mix(F.gelu(self.norm(x)))  # [B, W, L]
        return mixed


class MultiScalePool(nn.Module):
    """Max, average and min pooling concatenated (triples the channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.max_pool1d(x, 2), F.avg_pool1d(x, 2), -F.max_pool1d(-x, 2)], dim=1)


@dataclass(frozen=True)
class ModelOutput:
    logits: torch.Tensor    # [B, n_classes]
    z_mean: torch.Tensor    # [B]
    z_logvar: torch.Tensor  # [B]
    features: torch.Tensor  # [B, hidden]: what the classifier's last layer reads (out-of-distribution distances)


def rest_frame_view(x: torch.Tensor, z: torch.Tensor, *, log_step: float, rest_bins: int) -> torch.Tensor:
    """x [B, C, n] on a log-wavelength grid -> [B, C, rest_bins], de-redshifted by z [B].

    On a log grid a redshift is a shift by ln(1 + z) / log_step bins. The rest grid has the input's step, ends where
    the input grid ends and starts ``rest_bins - n`` bins bluer; values are linearly interpolated, 0 where the
    input does not reach (the coverage channel says so too).
    """
    b, c, n = x.shape
    j = torch.arange(rest_bins, device=x.device, dtype=torch.float32)
    pos = j[None, :] - (rest_bins - n) + torch.log1p(z.float())[:, None] / log_step  # [B, rest_bins]
    i0 = pos.floor()
    w = (pos - i0).to(x.dtype)[:, None, :]                                             # [B, 1, rest_bins]
    i0 = i0.long()
    inside = ((i0 >= 0) & (i0 < n - 1)).to(x.dtype)[:, None, :]
    lo = i0.clamp(0, n - 1)[:, None, :].expand(b, c, rest_bins)
    hi = (i0 + 1).clamp(0, n - 1)[:, None, :].expand(b, c, rest_bins)
    return (x.gather(2, lo) * (1 - w) + x.gather(2, hi) * w) * inside


class SpectraNet(nn.Module):
    def __init__(self, config: ModelConfig, *, redshift_head: bool = True, classifier: bool = True) -> None:
        super().__init__()
        self.config = config
        pool_factor = 3 if config.pooling == "multiscale" else 1
        stages, in_ch = [], config.in_channels
        for width, kernels in zip(config.widths, config.kernels):
            stages.append(MultiScaleBlock(in_ch, width, kernels, config.norm))
            in_ch = width * pool_factor
        self.stages = nn.ModuleList(stages)
        self.pool: nn.Module = MultiScalePool() if config.pooling == "multiscale" else nn.MaxPool1d(2)
        feat = 2 * config.widths[-1]  # global average + global max
        self.trunk = nn.Sequential(nn.Linear(feat, config.hidden), nn.GELU(), nn.Dropout(config.dropout))
        # with two networks this one predicts z only, and the rest-frame network only classifies
        self.classifier = (nn.Linear(config.hidden, config.n_classes) if classifier and not config.two_networks
                           else None)
        self.redshift = nn.Linear(config.hidden, 2) if redshift_head else None
        self.rest_net = (SpectraNet(replace(config, n_bins=config.rest_bins, two_networks=False, rest_bins=0,
                                            redshift_members=1, classifier_views=(), input_bins=()),
                                    redshift_head=False)
                         if config.two_networks else None)
        # further redshift networks: this one's architecture without a classifier or a rest-frame network
        self.z_members = nn.ModuleList(
            SpectraNet(replace(config, two_networks=False, rest_bins=0, redshift_members=1, classifier_views=(),
                               input_bins=()), classifier=False)
            for _ in range(config.redshift_members - 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in_channels, n_bins]
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                x = self.pool(x)                                   # [B, W(*3), L/2]
        x = torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)       # [B, 2W]
        h: torch.Tensor = self.trunk(x)                            # [B, hidden]
        return h

    def _classify(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_classes] from features [B, hidden]; with two networks only the rest-frame one classifies."""
        if self.classifier is None:
            raise TypeError("this network predicts z only (two_networks): its rest_net classifies")
        logits: torch.Tensor = self.classifier(h)
        return logits

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> ModelOutput:
        """``z`` [B]: the redshift each rest-frame view uses (two networks only); None or NaN rows use the network's
        own prediction, which is how training shows the classifier the redshift errors it will meet at inference."""
        x = self._read_bins(x)
        h = self.features(x)
        z_mean, z_logvar = self._redshift(h)
        if len(self.z_members):
            others = [m._redshift(m.features(x)) for m in cast(list[SpectraNet], list(self.z_members))]
            z_mean, z_logvar = combine_redshifts(torch.stack([z_mean] + [m for m, _ in others]),
                                                 torch.stack([z_logvar] + [v for _, v in others]))
        if self.rest_net is None:
            return ModelOutput(logits=self._classify(h), z_mean=z_mean, z_logvar=z_logvar, features=h)
        own = z_mean.detach()
        logits, h_rest = self._classify_rest_frame(x, own if z is None else torch.where(torch.isnan(z), own, z))
        return ModelOutput(logits=logits, z_mean=z_mean, z_logvar=z_logvar, features=h_rest)

    def _redshift(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z mean [B], z log-variance [B]) from features [B, hidden]."""
        if self.redshift is None:
            raise TypeError("a network built without the redshift head is read through features() and _classify()")
        zz: torch.Tensor = self.redshift(h)                        # [B, 2]
        return zz[:, 0], zz[:, 1].clamp(-20.0, 10.0)

    def classify_at(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_classes] of the classifier on the rest-frame view of ``x`` at redshifts ``z`` [B] (two
        networks only), without running the redshift network: how a refined redshift is classified again."""
        return self._classify_rest_frame(self._read_bins(x), z)[0]

    def _read_bins(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with both channels zeroed outside ``config.input_bins`` (unchanged when it is ())."""
        if not self.config.input_bins:
            return x
        first, stop = self.config.input_bins
        keep = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
        keep[first:stop] = 1.0
        return x * keep

    def _classify_rest_frame(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, C], features [B, hidden]) of the rest-frame classifier at ``z``; with ``classifier_views`` the
        means over the views at ln(1 + z) + d, run as one batch."""
        if self.rest_net is None:
            raise TypeError("classify_at needs a two-network model (its classifier reads the rest frame)")
        views = self.config.classifier_views
        if views:
            n = len(x)
            z = torch.cat([torch.expm1(torch.log1p(z.clamp(min=0.0)) + d) for d in views])
            x = x.repeat(len(views), 1, 1)
        rest = rest_frame_view(x, z.clamp(0.0, self.config.max_shift_z), log_step=self.config.log_step,
                               rest_bins=self.config.rest_bins)
        h_rest = self.rest_net.features(rest)                      # [B * views, hidden]
        logits = self.rest_net._classify(h_rest)
        if views:
            return logits.view(len(views), n, -1).mean(0), h_rest.view(len(views), n, -1).mean(0)
        return logits, h_rest


def combine_redshifts(z_mean: torch.Tensor, z_logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-variance combination of M Gaussian redshift estimates, z_mean and z_logvar [M, B], in ln(1 + z)
    (each clipped at z >= 0, as the engine reports them): returns the combined (z mean [B], z log-variance [B])."""
    z = z_mean.clamp(min=0.0)
    ln = torch.log1p(z)                                            # [M, B]
    weight = (1.0 + z) ** 2 * torch.exp(-z_logvar)                 # 1 / variance of ln(1 + z)
    ln_mean = (weight * ln).sum(0) / weight.sum(0)
    z_comb = torch.expm1(ln_mean)
    var = (1.0 + z_comb) ** 2 / weight.sum(0)
    return z_comb, torch.log(var).clamp(-20.0, 10.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: SpectraNet) -> int:
    """Floating-point operations for one spectrum (forward pass), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, model.config.in_channels, model.config.n_bins)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())
