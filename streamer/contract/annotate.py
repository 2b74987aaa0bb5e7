"""From a packet and its prediction to the annotated-spectrum record (the output contract).

Pure functions: no I/O, so the shape of the output contract is tested without a broker or a database.

The redshift is the packet's prior when it has one (method ``prior``), else the network's refined by template
cross-correlation where a template matched well (``template``), else the network's (``model``); ``z_network`` keeps
the network's own and ``template`` names the best-matching template. ``confident`` and the ``out_of_distribution``
quality flag come from the checkpoint's calibration (``science.inference``); ``called_class`` is the class called
down the taxonomy's tree (``science.taxonomy.hierarchical_call``).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from spectranet.schemas import SCHEMA_VERSION
from spectranet.streamer.errors import ConfigError
from spectranet.streamer.science.templates import METHOD_TEMPLATE, TemplateBank, TemplateMatch

if TYPE_CHECKING:  # types only: runtime/db.py imports this module's limits without loading torch
    from spectranet.streamer.science.checkpoint import Checkpoint
    from spectranet.streamer.science.inference import Prediction
    from spectranet.streamer.science.preprocess import Prepared

__all__ = ["Source", "annotation_id", "build_annotation", "OUT_OF_DISTRIBUTION", "TEMPLATE_STRING_LIMITS",
           "check_template_bank"]

OUT_OF_DISTRIBUTION: Final = "out_of_distribution"  # the quality flag of a spectrum outside the taxonomy

TEMPLATE_STRING_LIMITS: Final[Mapping[str, int]] = MappingProxyType({"object": 64, "type": 32})
"""Longest template name and type, in characters: the ``classifications.template_*`` columns are this long."""

_NAMESPACE = uuid.UUID("6f1c5a3e-2b7d-5c8e-9a41-5e7c0d2b9f10")
_COPIED = ("spectrum_id", "revision", "object_id", "survey", "tns_name", "candid", "dia_object_id", "ra", "dec",
           "instrument", "obs_mjd")


@dataclass(frozen=True)
class Source:
    topic: str
    partition: int
    offset: int


def annotation_id(spectrum_id: str, revision: int, model_name: str, model_version: str) -> str:
    """Same inputs, same id: a re-delivered packet is recognisable downstream."""
    return str(uuid.uuid5(_NAMESPACE, f"{spectrum_id}\x1f{revision}\x1f{model_name}\x1f{model_version}"))


def _as_datetime(value: datetime | int) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(value / 1000, tz=timezone.utc)


def check_template_bank(bank: TemplateBank) -> None:
    """``ConfigError`` unless every template's object and type fit the output's limits (``TEMPLATE_STRING_LIMITS``):
    a bank is checked once at start-up, so that no annotation can fail on a template name."""
    for name, values in (("object", bank.objects), ("type", bank.types)):
        limit = TEMPLATE_STRING_LIMITS[name]
        too_long = sorted({v for v in values if len(v) > limit})
        if too_long:
            raise ConfigError(f"template bank {bank.version or '(unnamed)'}: {len(too_long)} template {name}s are "
                              f"longer than {limit} characters, e.g. {too_long[0][:80]!r}")


def _template(match: TemplateMatch | None) -> dict[str, Any] | None:
    if match is None:
        return None
    return {"object": match.object, "type": match.type, "phase": None if math.isnan(match.phase) else match.phase,
            "r": match.r}


def build_annotation(packet: Mapping[str, Any], prepared: Prepared, prediction: Prediction, model: Checkpoint, *,
                     source: Source, consumed_at: datetime, classified_at: datetime) -> dict[str, Any]:
    """The annotated-spectrum record (output schema dict)."""
    prior = packet.get("redshift_prior")
    network = {"z_network": prediction.z_network, "template": _template(prediction.template)}
    if prior is not None:
        redshift = {"z": float(prior["z"]), "z_err": prior.get("z_err"), "method": "prior", **network}
    else:
        method = "template" if prediction.z_method == METHOD_TEMPLATE else "model"
        redshift = {"z": prediction.z, "z_err": prediction.z_err, "method": method, **network}
    flags = list(prepared.flags)
    if prediction.out_of_distribution and OUT_OF_DISTRIBUTION not in flags:
        flags.append(OUT_OF_DISTRIBUTION)
    ranked = sorted(prediction.probabilities.items(), key=lambda kv: kv[1], reverse=True)
    snr = prepared.median_snr
    return {
        "schema_version": SCHEMA_VERSION,
        "annotation_id": annotation_id(packet["spectrum_id"], packet["revision"], model.name, model.version),
        **{k: packet.get(k) for k in _COPIED},
        "classifier": {"name": model.name, "version": model.version, "weights_sha256": model.weights_sha256,
                       "taxonomy": list(model.taxonomy)},
        "classifications": [{"class_name": c, "probability": p} for c, p in ranked],
        "top_class": prediction.top_class,
        "top_probability": prediction.top_probability,
        "confident": prediction.confident,
        "called_class": prediction.called_class,
        "redshift": redshift,
        "quality": {"coverage_fraction": float(prepared.coverage_fraction),
                    "median_snr": None if snr != snr else float(snr),  # NaN -> null
                    "ood_score": prediction.ood_score,
                    "flags": flags},
        "timing": {"produced_at": _as_datetime(packet["produced_at"]), "consumed_at": consumed_at,
                   "classified_at": classified_at},
        "source": {"topic": source.topic, "partition": source.partition, "offset": source.offset},
    }
