"""Tests of spectranet.streamer.science.taxonomy: the issue's mapping examples, ambiguity rules, and every label in the
shared data."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from spectranet.streamer.science.taxonomy import CLASSES, hierarchical_call, map_label

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "manifest.csv"


def test_classes_are_exactly_taxonomy_v1():
    assert CLASSES == ("Ia", "Ib", "Ic", "Ic-BL", "II", "IIn", "IIb", "SLSN-I", "TDE")


@pytest.mark.parametrize("raw, expected", [
    # the examples of issue 3
    ("SN Ia-91T", "Ia"), ("Ia Pec", "Ia"), ("Ia CSM", "Ia"), ("Ia-02cx", "Ia"),
    ("II P", "II"), ("IIL", "II"), ("II Pec", "II"),
    ("Ic BL", "Ic-BL"), ("BL-Ic", "Ic-BL"),
    ("Ca-rich", "Ib"),
    ("Super-Luminous Ic", "SLSN-I"), ("SLSN-R", "SLSN-I"),
    # spelling variants: case, prefixes, separators
    ("ia", "Ia"), ("  SN Ia  ", "Ia"), ("Ia_91bg", "Ia"), ("Iax", "Ia"), ("Type II", "II"), ("SN IIP", "II"),
    ("sn ic-bl", "Ic-BL"), ("Ic-broad", "Ic-BL"), ("SN Ic BL", "Ic-BL"),
    ("Ib-norm", "Ib"), ("Ic-pec", "Ic"), ("SLSN-I", "SLSN-I"), ("SLSN-I-R", "SLSN-I"), ("TDE/TDE-H-He", "TDE"),
    # subclasses that share a prefix must not collapse into the parent class
    ("IIb", "IIb"), ("SN IIn", "IIn"), ("IIn-pec", "IIn"), ("Ic", "Ic"), ("Ib", "Ib"),
    # alternatives within one class are fine
    ("SN Ia/Iax", "Ia"),
])
def test_reported_labels_map_to_classes(raw, expected):
    assert map_label(raw) == expected


@pytest.mark.parametrize("raw", [
    # ambiguous: excluded from training and scoring
    "Ib/c", "Ib/Ic", "SN Ib/c", "Ia?", "II?", "IIb?", "Ic-BL?", "SLSN-I?", "TDE?", "?", "SLSN-II", "SLSN-IIn",
    "Ia/Ic", "IIb/Ib", "IIb/Ib/Ic", "IIn/Ibn", "Ib-IIb", "I", "SN I",
    # outside taxonomy v1
    "Ibn", "Icn", "AGN/QSO", "GAP/LBV", "LBV", "KN/17gfo", "LFBOT/18cow", "Galaxy/Sa", "Star/M-star", "Others",
    "backup", "AT", "",
    "   ",
])
def test_ambiguous_and_foreign_labels_map_to_none(raw):
    assert map_label(raw) is None


def test_none_label_maps_to_none():
    assert map_label(None) is None


def test_every_label_in_the_shared_manifest_maps_to_a_class_or_none():
    if not MANIFEST.is_file():
        pytest.skip(f"shared data manifest {MANIFEST} is not present in this checkout")
    with MANIFEST.open(newline="") as f:
        counts = Counter(row["type"] for row in csv.DictReader(f))
    assert counts, "the manifest lists no spectra"
    mapped = {label: map_label(label) for label in counts}
    assert set(mapped.values()) <= set(CLASSES) | {None}
    # every class of the taxonomy is supported by real data
    assert set(mapped.values()) - {None} == set(CLASSES)
    assert all(mapped[label] is None for label in counts if "?" in label)
    # most spectra are usable: the exclusions are the ambiguous and foreign minority
    usable = sum(n for label, n in counts.items() if mapped[label] is not None)
    assert usable > 0.8 * sum(counts.values())


# ------------------------------------------------------------------------------------ the call down the tree


def _probs(**p: float) -> np.ndarray:
    row = np.array([p.get(c.replace("-", "_"), 0.0) for c in CLASSES])
    assert row.sum() == pytest.approx(1.0)
    return row[None, :]


def _call(**p: float) -> str:
    return CLASSES[int(hierarchical_call(_probs(**p), CLASSES)[0])]


def test_the_call_is_not_ia_when_ia_is_most_probable_but_holds_less_than_half():
    assert _call(Ia=0.40, Ic=0.30, Ib=0.20, II=0.10) == "Ic"       # not Ia 0.60; H-poor 0.50 > H-rich 0.10
    assert _call(Ia=0.50, Ic=0.30, Ib=0.20) == "Ia"                # half is enough
    assert _call(Ia=0.45, II=0.20, IIb=0.15, Ic=0.20) == "II"      # H-rich 0.35 > H-poor 0.20


def test_below_ia_the_group_with_the_most_probability_wins_not_the_single_class():
    # IIb is the most probable class, but the H-poor group holds more than the H-rich one
    assert _call(Ia=0.05, IIb=0.30, II=0.05, Ib=0.25, Ic=0.20, Ic_BL=0.15) == "Ib"
    assert _call(Ia=0.10, SLSN_I=0.35, Ic=0.15, Ib=0.15, Ic_BL=0.25) == "Ic-BL"  # H-poor 0.55 vs SLSN-I 0.35


def test_the_call_is_the_top_class_whenever_one_class_holds_half():
    p = np.random.default_rng(3).dirichlet(np.full(len(CLASSES), 0.3), size=5000)
    calls = hierarchical_call(p, CLASSES)
    decided = p.max(axis=1) >= 0.5
    assert decided.sum() > 1000 and (calls[decided] == p[decided].argmax(axis=1)).all()
    assert (calls[~decided] != p[~decided].argmax(axis=1)).any()  # and not only then


def test_the_call_for_other_taxonomies_and_bad_shapes():
    classes = ("II", "Ib", "AGN")                       # no Ia; a class in no group is a branch of its own
    p = np.array([[0.45, 0.0, 0.55], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
    assert [classes[i] for i in hierarchical_call(p, classes)] == ["AGN", "AGN", "Ib"]
    assert list(hierarchical_call(np.array([[1.0]]), ("Ia",))) == [0]
    with pytest.raises(ValueError, match=r"\[B, 9\]"):
        hierarchical_call(np.ones((2, 8)) / 8, CLASSES)
