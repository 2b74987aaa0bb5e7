"""The Avro contract of SpectraNet Stream, versioned by folder and namespace.

``<major>/<minor>/<name>.avsc`` holds each version; every record's namespace carries it (``spectranet.v1_0``) so
several versions load side by side. ``latest.txt`` names the version producers write, read once into
``SCHEMA_VERSION``: the one place the current version is spelled (the ``schema_version`` field of every record the
project builds, the codec's default reader schema).

Every version folder holds every schema in ``SCHEMA_NAMES``, so the input and the output contract move together and
one version number names both; ``tests/test_schema_versions.py`` checks this, and round-trips the golden samples
that ``tests/data/golden/`` keeps for every schema of every version.

Adding a version: copy the newest folder to ``<major>/<minor+1>/``, change the namespaces, the ``schema_version``
default and the fields, give each schema a new id in ``BUNDLED_SCHEMA_IDS`` (ids are never reused or renumbered:
messages in the Confluent framing carry them), point ``latest.txt`` at it, regenerate ``docs/schemas.md`` and add
its golden samples (``python tests/data/golden/make_golden.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from importlib.abc import Traversable
from types import MappingProxyType
from typing import Any, Final, cast

import fastavro

__all__ = [
    "SPECTRUM_PACKET",
    "ANNOTATED_SPECTRUM",
    "SCHEMA_NAMES",
    "SCHEMA_VERSION",
    "BUNDLED_SCHEMA_IDS",
    "latest_version",
    "versions",
    "load_schema",
    "raw_schema",
]

SPECTRUM_PACKET: Final = "spectrum_packet"
ANNOTATED_SPECTRUM: Final = "annotated_spectrum"
SCHEMA_NAMES: Final[tuple[str, ...]] = (SPECTRUM_PACKET, ANNOTATED_SPECTRUM)


def _root() -> Traversable:
    return resources.files(__name__)


SCHEMA_VERSION: Final[str] = _root().joinpath("latest.txt").read_text().strip()
"""The current 'major.minor' version of every schema (from ``latest.txt``)."""

BUNDLED_SCHEMA_IDS: Final[Mapping[int, tuple[str, str]]] = MappingProxyType({
    1: (SPECTRUM_PACKET, "1.0"),
    2: (ANNOTATED_SPECTRUM, "1.0"),
    3: (SPECTRUM_PACKET, "1.1"),
    4: (ANNOTATED_SPECTRUM, "1.1"),
    5: (SPECTRUM_PACKET, "1.2"),
    6: (ANNOTATED_SPECTRUM, "1.2"),
})
"""Confluent schema ids of the bundled schemas, for deployments without a registry: append-only, one per
(schema, version), the same in every producer and consumer."""


def latest_version() -> str:
    """The 'major.minor' version that producers write by default (``SCHEMA_VERSION``)."""
    return SCHEMA_VERSION


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
    major, minor = (version or SCHEMA_VERSION).split(".")
    path = _root().joinpath(major, minor, f"{name}.avsc")
    if not path.is_file():
        raise KeyError(f"no schema {name!r} at version {major}.{minor}; bundled: {versions()}")
    return dict(json.loads(path.read_text()))


@cache
def load_schema(name: str, version: str | None = None) -> dict[str, Any]:
    """The parsed fastavro schema; parsing is cached because the hot path decodes with it."""
    return cast(dict[str, Any], fastavro.parse_schema(raw_schema(name, version or SCHEMA_VERSION)))
