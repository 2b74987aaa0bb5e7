"""The Avro contract of SpectraNet Stream, versioned by folder and namespace.

``<major>/<minor>/<name>.avsc`` holds each version; every record's namespace carries it (``spectranet.v1_0``) so
several versions load side by side. ``latest.txt`` names the version producers should write.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import fastavro

__all__ = ["SPECTRUM_PACKET", "ANNOTATED_SPECTRUM", "latest_version", "versions", "load_schema", "raw_schema"]

SPECTRUM_PACKET = "spectrum_packet"
ANNOTATED_SPECTRUM = "annotated_spectrum"


def _root() -> Any:
    return resources.files(__name__)


def latest_version() -> str:
    """The 'major.minor' version that producers write by default."""
    return _root().joinpath("latest.txt").read_text().strip()


def versions() -> list[str]:
    """Every bundled version, oldest first."""
    found = []
    for major in _root().iterdir():
        if major.is_dir() and major.name.isdigit():
            for minor in major.iterdir():
                if minor.is_dir() and minor.name.isdigit():
                    found.append((int(major.name), int(minor.name)))
    return [f"{a}.{b}" for a, b in sorted(found)]


def raw_schema(name: str, version: str | None = None) -> dict[str, Any]:
    """The schema as JSON (a dict), e.g. for documentation or registering with a schema registry."""
    major, minor = (version or latest_version()).split(".")
    path = _root().joinpath(major, minor, f"{name}.avsc")
    if not path.is_file():
        raise KeyError(f"no schema {name!r} at version {major}.{minor}; bundled: {versions()}")
    return json.loads(path.read_text())


@cache
def load_schema(name: str, version: str | None = None) -> dict[str, Any]:
    """The parsed fastavro schema; parsing is cached because the hot path decodes with it."""
    return fastavro.parse_schema(raw_schema(name, version or latest_version()))
