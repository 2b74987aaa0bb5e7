"""Taxonomy v1 and the mapping from labels as reported (TNS, OSC, WISeREP, SNID templates) to its classes.

Ambiguous labels (``Ib/c``, anything with ``?``, ``SLSN-II``, alternatives naming different classes such as
``Ia/Ic``) map to ``None`` and are excluded from training and scoring; so are classes outside the taxonomy (AGN,
stars, kilonovae, LBVs, ...).
"""

from __future__ import annotations

import re

__all__ = ["TAXONOMY_VERSION", "CLASSES", "map_label"]

TAXONOMY_VERSION = "1"
CLASSES: tuple[str, ...] = ("Ia", "Ib", "Ic", "Ic-BL", "II", "IIn", "IIb", "SLSN-I", "TDE")

# Checked in order after normalisation (upper-case, 'SN ' prefix dropped, separators unified to '-').
_RULES: tuple[tuple[str, str], ...] = (
    (r"^(SLSN-?I|SLSN-?I-?R|SLSN-?R|SUPER-?LUMINOUS-?IC?|SLSN-?IB?C?)$", "SLSN-I"),
    (r"^TDE([-/].*)?$", "TDE"),
    (r"^(IC-?BL|BL-?IC|IC-?BROAD|IC-?BROAD-?LINE|IC-?HN|IC-?BL-?GRB)$", "Ic-BL"),
    (r"^IIB(-.*)?$", "IIb"),
    (r"^IIN(-.*)?$", "IIn"),
    (r"^(II|IIP|II-?P|IIL|II-?L|II-?PEC|II-?NORM|II-?87A)$", "II"),
    (r"^(IB|IB-?NORM|IB-?PEC|CA-?RICH|IB-?CA(-?RICH)?)$", "Ib"),
    (r"^(IC|IC-?NORM|IC-?PEC)$", "Ic"),
    (r"^(\.?IA.*|LENSED-?SN-?IA)$", "Ia"),
)
_AMBIGUOUS = re.compile(r"\?|IB/C|IBC|SLSN-?II|IIN/IBN|/IBN|^I$")


def _normalise(raw: str) -> str:
    s = raw.strip().upper()
    s = re.sub(r"^(SN|AT|TYPE)\s+", "", s)
    s = re.sub(r"[\s_]+", "-", s)
    return s


def map_label(raw: str | None) -> str | None:
    """Taxonomy class for a reported label, or ``None`` when it is ambiguous or outside the taxonomy."""
    if raw is None or not raw.strip():
        return None
    s = _normalise(raw)
    if _AMBIGUOUS.search(s):
        return None
    # 'TDE/TDE-H' (category/subtype) and 'Ia/Iax' agree on one class; 'Ia/Ic' or 'IIb/Ib' is ambiguous.
    classes = {_match(part) for part in s.split("/")}
    return classes.pop() if len(classes) == 1 else None


def _match(label: str) -> str | None:
    for pattern, cls in _RULES:
        if re.match(pattern, label):
            return cls
    return None
