"""Every schema of every bundled version: its golden samples round-trip, and every field is documented.

``tests/data/golden/`` keeps, for each version folder ``schemas/<major>/<minor>/`` and each schema in it, the record
as plain JSON and its bytes in each framing the codec writes (``make_golden.py`` writes the current version's).
A missing sample fails, so a new version cannot ship without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fastavro
import pytest
import spectranet.schemas as schemas
from spectranet.streamer.contract.codec import BundledSchemas, Codec, Framing, sniff_framing

from tests.support.golden import plain_json

GOLDEN = Path(__file__).parent / "data" / "golden"
FRAMINGS: tuple[Framing, ...] = ("schemaless", "confluent", "container")
SCHEMAS = [(name, version) for version in schemas.versions() for name in schemas.SCHEMA_NAMES]
_CONTAINER_SYNC = 16  # bytes of the random sync marker that ends an Avro container file


def _golden(name: str, version: str, suffix: str) -> Path:
    path = GOLDEN / f"{name}_v{version.replace('.', '_')}.{suffix}"
    assert path.is_file(), f"no golden sample {path.name}: python tests/data/golden/make_golden.py"
    return path


def _added_fields(current: Any, written: Any, path: str = "") -> tuple[Any, dict[str, Any]]:
    """``current`` (a record decoded with a newer reader schema) without the fields that ``written`` (the record as its
    producer wrote it) lacks, nested records included, and those fields with their values by dotted path."""
    if not (isinstance(current, dict) and isinstance(written, dict)):
        return current, {}
    kept, added = {}, {}
    for key, value in current.items():
        if key not in written:
            added[f"{path}{key}"] = value
            continue
        kept[key], deeper = _added_fields(value, written[key], f"{path}{key}.")
        added.update(deeper)
    return kept, added


def _undocumented(schema: Any, path: str = "") -> list[str]:
    """Every field, nested records included, whose ``doc`` is missing or blank."""
    if isinstance(schema, list):
        return [bad for branch in schema for bad in _undocumented(branch, path)]
    if not isinstance(schema, dict):
        return []
    if schema.get("type") == "array":
        return _undocumented(schema["items"], path)
    if schema.get("type") == "map":
        return _undocumented(schema["values"], path)
    found = []
    for f in schema.get("fields", []):
        where = f"{path}{f['name']}"
        if not str(f.get("doc") or "").strip():
            found.append(where)
        found += _undocumented(f["type"], where + ".")
    return found


def test_every_version_holds_every_schema_and_the_current_one_is_bundled() -> None:
    assert schemas.SCHEMA_VERSION in schemas.versions()
    root = Path(schemas.__file__).parent
    for version in schemas.versions():
        folder = root.joinpath(*version.split("."))
        assert sorted(p.stem for p in folder.glob("*.avsc")) == sorted(schemas.SCHEMA_NAMES), version


def test_every_schema_of_every_version_has_one_bundled_id() -> None:
    ids = list(schemas.BUNDLED_SCHEMA_IDS.values())
    assert sorted(ids) == sorted(SCHEMAS)
    assert len(set(ids)) == len(ids)


def test_golden_samples_belong_to_a_bundled_schema() -> None:
    expected = {f"{n}_v{v.replace('.', '_')}.{s}" for n, v in SCHEMAS for s in (*(f"{f}.avro" for f in FRAMINGS),
                                                                                 "json")}
    found = {p.name for p in GOLDEN.iterdir() if p.suffix in {".avro", ".json"}}
    assert found == expected


@pytest.mark.parametrize("name, version", SCHEMAS)
def test_reader_schema_is_namespaced_versioned_and_documented(name: str, version: str) -> None:
    raw = schemas.raw_schema(name, version)
    major, minor = version.split(".")
    assert raw["namespace"] == f"spectranet.v{major}_{minor}"
    assert str(raw.get("doc") or "").strip(), f"{name} {version}: the record has no doc"
    version_field = next(f for f in raw["fields"] if f["name"] == "schema_version")
    assert version_field["default"] == version
    assert _undocumented(raw) == []


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("name, version", SCHEMAS)
def test_golden_bytes_decode_and_re_encode_to_the_same_bytes(name: str, version: str, framing: Framing) -> None:
    data = _golden(name, version, f"{framing}.avro").read_bytes()
    expected = json.loads(_golden(name, version, "json").read_text())
    assert expected["schema_version"] == version
    codec = Codec(name, version=version)
    assert sniff_framing(data) == framing
    record = codec.decode(data)
    assert plain_json(record) == expected
    again = codec.encode(record, framing=framing)
    if framing == "container":
        # The container's sync marker is random per file (it also ends the header): compare with the golden's.
        sync = again[-_CONTAINER_SYNC:]
        assert again.count(sync) == 2
        again = again.replace(sync, data[-_CONTAINER_SYNC:])
    assert again == data


@pytest.mark.parametrize("framing", ["confluent", "container"])
@pytest.mark.parametrize("name, version", SCHEMAS)
def test_every_version_decodes_under_the_current_reader_schema(name: str, version: str, framing: Framing) -> None:
    """What an older producer wrote (writer schema by id or inside the container) still reads today."""
    data = _golden(name, version, f"{framing}.avro").read_bytes()
    if framing == "confluent":
        sid = int.from_bytes(data[1:5], "big")
        assert BundledSchemas().ids[sid] == (name, version)
    current = Codec(name).decode(data)
    reader_fields = [f["name"] for f in schemas.raw_schema(name)["fields"]]
    assert sorted(current) == sorted(reader_fields)  # resolution appends fields the writer lacked
    written = json.loads(_golden(name, version, "json").read_text())
    shared = [k for k in reader_fields if k in written and k != "schema_version"]
    kept, added = _added_fields({k: plain_json(current[k]) for k in shared}, {k: written[k] for k in shared})
    assert shared and kept == {k: written[k] for k in shared}
    assert set(added.values()) <= {None}, added  # fields newer than the writer are optional, with null defaults


def test_the_undocumented_check_finds_a_nested_field_without_doc() -> None:
    raw = schemas.raw_schema(schemas.ANNOTATED_SPECTRUM)
    nested = next(f for f in raw["fields"] if f["name"] == "redshift")["type"]["fields"]
    nested[0] = {k: v for k, v in nested[0].items() if k != "doc"}
    assert _undocumented(raw) == ["redshift.z"]
    fastavro.parse_schema(raw)  # still a valid schema: only the doc is missing
