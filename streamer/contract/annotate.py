"""From a packet and its prediction to the annotated-spectrum record (the output contract).

Pure functions: no I/O, so the shape of the output contract is tested without a broker or a database.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from spectranet.schemas import SCHEMA_VERSION
from spectranet.streamer.science.checkpoint import Checkpoint
from spectranet.streamer.science.inference import Prediction
from spectranet.streamer.science.preprocess import Prepared

__all__ = ["Source", "annotation_id", "build_annotation"]

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


def build_annotation(packet: Mapping[str, Any], prepared: Prepared, prediction: Prediction, model: Checkpoint, *,
                     source: Source, consumed_at: datetime, classified_at: datetime) -> dict[str, Any]:
    """The annotated-spectrum record (output schema dict)."""
    prior = packet.get("redshift_prior")
    if prior is not None:
        redshift = {"z": float(prior["z"]), "z_err": prior.get("z_err"), "method": "prior"}
    else:
        redshift = {"z": prediction.z, "z_err": prediction.z_err, "method": "model"}
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
        "redshift": redshift,
        "quality": {"coverage_fraction": float(prepared.coverage_fraction),
                    "median_snr": None if snr != snr else float(snr),  # NaN -> null
                    "ood_score": prediction.ood_score,
                    "flags": list(prepared.flags)},
        "timing": {"produced_at": _as_datetime(packet["produced_at"]), "consumed_at": consumed_at,
                   "classified_at": classified_at},
        "source": {"topic": source.topic, "partition": source.partition, "offset": source.offset},
    }
