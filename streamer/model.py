"""SpectraNet (arXiv:2510.07215): multi-scale 1-D convolutions over a spectrum, with class and redshift heads.

Each of five stages runs three same-padded convolutions with different kernel sizes in parallel (narrow lines and
broad P-Cygni features at once), concatenates them, normalises channel-wise (LayerNorm over channels at each
wavelength; BatchNorm as an ablation), applies GELU and mixes back to the stage width with a 1x1 convolution.
Stages are separated by max-pooling, or by "multi-scale pooling" (max, average and min concatenated; the
reference's earlier variant).
Global average+max pooling feeds an MLP trunk with two heads: class logits over the taxonomy and a Gaussian
redshift (mean and log-variance, trained with Gaussian NLL).

Presets are data (``PRESETS``); a checkpoint stores the ``ModelConfig`` that built it so loading rebuilds it exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "PRESETS", "DEFAULT_PRESET", "SpectraNet", "ModelOutput", "count_parameters", "count_flops"]


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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        d["kernels"] = tuple(tuple(k) for k in d["kernels"])
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # CPU-friendly: classifies hundreds of spectra per second on two cores.
    "default": ModelConfig(),
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
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


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
        return self.mix(F.gelu(self.norm(x)))                 # [B, W, L]


class MultiScalePool(nn.Module):
    """Max, average and min pooling concatenated (triples the channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.max_pool1d(x, 2), F.avg_pool1d(x, 2), -F.max_pool1d(-x, 2)], dim=1)


@dataclass(frozen=True)
class ModelOutput:
    logits: torch.Tensor    # [B, n_classes]
    z_mean: torch.Tensor    # [B]
    z_logvar: torch.Tensor  # [B]


class SpectraNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
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
        self.classifier = nn.Linear(config.hidden, config.n_classes)
        self.redshift = nn.Linear(config.hidden, 2)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        # x: [B, in_channels, n_bins]
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                x = self.pool(x)                                   # [B, W(*3), L/2]
        x = torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)       # [B, 2W]
        h = self.trunk(x)                                          # [B, hidden]
        z = self.redshift(h)                                       # [B, 2]
        return ModelOutput(logits=self.classifier(h), z_mean=z[:, 0], z_logvar=z[:, 1].clamp(-20.0, 10.0))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: SpectraNet) -> int:
    """Floating-point operations for one spectrum (forward pass), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, model.config.in_channels, model.config.n_bins)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())
