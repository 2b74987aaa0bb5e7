"""Spectrum files in: publish them as packets (``spectranet produce``) or classify them directly
(``spectranet classify``)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from confluent_kafka import KafkaError
from spectranet.schemas import SCHEMA_VERSION
from spectranet.streamer.contract.annotate import OUT_OF_DISTRIBUTION
from spectranet.streamer.contract.codec import Codec, Framing
from spectranet.streamer.contract.readers import SpectrumFile, flux_err_as_sigma, prepare_file, read_spectrum
from spectranet.streamer.errors import ConfigError, PacketError, SpectraNetError, SpectrumFileError
from spectranet.streamer.runtime.kafka_io import KafkaWatch, make_producer
from spectranet.streamer.science.inference import InferenceEngine, Prediction
from spectranet.streamer.science.preprocess import Prepared
from spectranet.streamer.science.templates import METHOD_TEMPLATE

__all__ = ["publish_files", "NOT_DELIVERED", "packet_from_file", "spectrum_id_for", "classify_files",
           "describe_result"]

NOT_DELIVERED = "<not delivered>"  # the path of publish_files' error entry for packets without a delivery


def publish_files(paths: Iterable[str], *, topic: str, bootstrap_servers: str, framing: Framing = "schemaless",
                  survey: str = "TNS", extra_config: Mapping[str, str] | None = None, timeout_s: float = 30.0,
                  watch: KafkaWatch | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Publish each file as a spectrum packet; returns (packets delivered, [(path, error)]).

    Gives up ``timeout_s`` after the last packet was handed to the producer: packets still without a delivery report
    are purged and reported as one ``(NOT_DELIVERED, "<n> of <m> packets not delivered ...: <why>")`` entry, where
    *why* is the front-door line (e.g. the broker is unreachable) when there is one. ``extra_config``: the security
    properties (TLS, SASL) as for the daemon.
    """
    extra = dict(extra_config or {})
    if extra.get("bootstrap.servers", bootstrap_servers) != bootstrap_servers:
        raise ConfigError("publish_files: bootstrap_servers and extra_config['bootstrap.servers'] differ")
    watch = watch or KafkaWatch(bootstrap_servers=bootstrap_servers)
    codec = Codec("spectrum_packet")
    # A delivery report within the timeout, success or failure: librdkafka's default is five minutes.
    producer = make_producer({**extra, "bootstrap.servers": bootstrap_servers},
                             overrides={"message.timeout.ms": max(int(timeout_s * 1000), 1)}, watch=watch)
    errors: list[tuple[str, str]] = []
    failures: list[str] = []
    produced = delivered = 0

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        nonlocal delivered
        if err is None:
            delivered += 1
        else:
            failures.append(err.str())

    for path in paths:
        try:
            packet = packet_from_file(read_spectrum(path), survey=survey)
        except SpectraNetError as exc:
            errors.append((str(path), str(exc)))
            continue
        producer.produce(topic, key=packet["object_id"].encode(), value=codec.encode(packet, framing=framing),
                         on_delivery=on_delivery)
        produced += 1
        producer.poll(0)
    if producer.flush(timeout_s):
        producer.purge()        # what is still queued or in flight fails now, with a delivery report each
        producer.flush(1.0)
    if delivered < produced:
        why = str(watch.problem) if watch.problem is not None else (failures[0] if failures else "no delivery report")
        errors.append((NOT_DELIVERED, f"{produced - delivered} of {produced} packets not delivered to {topic!r} "
                                      f"within {timeout_s:g} s: {why}"))
    return delivered, errors


def _result(path: str, prepared: Prepared, pred: Prediction, inference: InferenceEngine) -> dict[str, Any]:
    """One file's result (``spectranet classify --json``): ``redshift`` is the final estimate (template-refined when
    ``redshift_method`` is "template"), ``redshift_network`` the network's own; the annotated record's vocabulary."""
    ck = inference.checkpoint
    flags = list(prepared.flags)
    if pred.out_of_distribution and OUT_OF_DISTRIBUTION not in flags:
        flags.append(OUT_OF_DISTRIBUTION)
    match = pred.template
    return {
        "file": path,
        "top_class": pred.top_class,
        "called_class": pred.called_class,
        "probabilities": pred.probabilities,
        "confident": pred.confident,
        "redshift": pred.z,
        "redshift_err": pred.z_err,
        "redshift_network": pred.z_network,
        "redshift_method": "template" if pred.z_method == METHOD_TEMPLATE else "model",
        "template": None if match is None else {
            "object": match.object, "type": match.type,
            "phase": None if math.isnan(match.phase) else match.phase, "r": match.r},
        "model": {"name": ck.name, "version": ck.version, "sha256": ck.weights_sha256},
        "quality": {"coverage_fraction": prepared.coverage_fraction,
                    "median_snr": None if math.isnan(prepared.median_snr) else prepared.median_snr,
                    "ood_score": pred.ood_score, "flags": flags},
    }


def describe_result(result: Mapping[str, Any]) -> str:
    """One line for a person: ``Ia 0.97 (confident) z=0.031±0.004 [template: looks like sn2011fe (Ia-norm) at +5 d]``
    (``(not confident)`` below the class's threshold, nothing when the model has none; ``[called Ic down the tree]``
    where the called class differs from the most probable one)."""
    if "error" in result:
        return f"ERROR {result['error']}"
    top = result["top_class"]
    confidence = {True: " (confident)", False: " (not confident)", None: ""}[result["confident"]]
    line = (f"{top} {result['probabilities'][top]:.2f}{confidence} "
            f"z={result['redshift']:.3f}±{result['redshift_err']:.3f}")
    called = result.get("called_class") or top
    if called != top:
        line += f" [called {called} {result['probabilities'][called]:.2f} down the tree: no class holds half]"
    t = result["template"]
    if t is not None:
        phase = "" if t["phase"] is None else f" at {round(t['phase']):+d} d"
        line += f" [template: looks like {t['object']} ({t['type']}){phase}]"
    if OUT_OF_DISTRIBUTION in result["quality"]["flags"]:
        line += " [out of distribution: not a class of the taxonomy?]"
    return line


def classify_files(paths: Iterable[str], inference: InferenceEngine, *,
                   batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """One result per path, in order; unreadable files yield ``{"file", "error"}`` and never stop the others.
    A rest-frame file is placed in the observer frame at its header redshift, which is then known: the classifier
    reads the rest frame of that redshift (``InferenceEngine.outputs``)."""
    pending: list[tuple[str, Prepared, float]] = []

    def flush() -> Iterator[dict[str, Any]]:
        preds = inference.predict([p for _, p, _ in pending], z_prior=[z for _, _, z in pending])
        for (path, prepared, _), pred in zip(pending, preds):
            yield _result(path, prepared, pred, inference)
        pending.clear()

    for path in paths:
        try:
            sf = read_spectrum(path)
            known_z = (sf.redshift or 0.0) if sf.frame == "rest" else math.nan  # as prepare_file places it
            pending.append((path, prepare_file(sf, inference.checkpoint.preprocess), known_z))
        except (SpectrumFileError, PacketError) as exc:
            yield from flush()  # keep output in input order
            yield {"file": path, "error": f"{type(exc).__name__}: {exc}"}
            continue
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def spectrum_id_for(object_id: str, wavelength: np.ndarray, flux: np.ndarray) -> str:
    """Stable id from the object and the data, so republishing the same file is recognised as the same spectrum."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(wavelength, dtype="<f8").tobytes())
    h.update(np.ascontiguousarray(flux, dtype="<f8").tobytes())
    return f"{object_id}:{h.hexdigest()[:16]}"


def packet_from_file(sf: SpectrumFile, *, survey: str = "TNS", revision: int = 0,
                     produced_at_ms: int | None = None) -> dict[str, Any]:
    """A spectrum packet (reader-schema dict) for a spectrum read from a file.

    The reported label and redshift stay in the header for bookkeeping; the packet carries a redshift prior only
    for rest-frame data, which cannot be placed on the observer-frame grid without it. An error column that holds
    variances is square-rooted, as ``prepare_file`` does (the packet's ``flux_err`` is 1-sigma).
    """
    object_id = sf.object_id or sf.header.get("object") or sf.path.rsplit("/", 1)[-1].split(".")[0]
    header = {k: str(v) for k, v in sf.header.items()}
    prior = None
    if sf.frame == "rest":
        prior = {"z": float(sf.redshift or 0.0), "z_err": None, "origin": "file header"}
    return {
        "schema_version": SCHEMA_VERSION,
        "spectrum_id": spectrum_id_for(object_id, sf.wavelength, sf.flux),
        "revision": revision,
        "object_id": object_id,
        "survey": survey,
        "tns_name": None,
        "candid": None,
        "dia_object_id": None,
        "ra": None,
        "dec": None,
        "instrument": sf.instrument or "unknown",
        "telescope": sf.telescope,
        "origin": None,
        "spectrum_type": "source",
        "obs_mjd": float(sf.mjd) if sf.mjd is not None else 0.0,
        "exptime": None,
        "wavelength": sf.wavelength.astype(float).tolist(),
        "flux": sf.flux.astype(float).tolist(),
        "flux_err": None if sf.flux_err is None else flux_err_as_sigma(sf.flux, sf.flux_err).astype(float).tolist(),
        "mask": None,
        "wavelength_unit": sf.wavelength_unit,
        "flux_unit": sf.flux_unit,
        "wavelength_frame": sf.frame,
        "wavelength_medium": "air",
        "flux_calibrated": sf.flux_calibrated,
        "resolving_power": None,
        "quality_flag": None,
        "redshift_prior": prior,
        "header": header,
        "produced_at": produced_at_ms if produced_at_ms is not None else int(time.time() * 1000),
    }
