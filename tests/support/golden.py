"""Golden samples' JSON form (how a decoded record is written to and compared with ``tests/data/golden/*.json``), and
the comparison of two schema versions' fields."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import spectranet.schemas as schemas

__all__ = ["plain_json", "schema_fields", "added_optional_fields"]


def plain_json(value: Any) -> Any:
    """A record as plain JSON: datetimes (timestamp-millis) become epoch milliseconds, as Avro stores them."""
    if isinstance(value, datetime):
        return round(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_json(v) for v in value]
    return value


def schema_fields(schema: Any) -> dict[str, Any]:
    """Every field of a record schema by dotted path (nested records, also inside unions), with its definition."""
    out: dict[str, Any] = {}

    def walk(record: dict[str, Any], path: str) -> None:
        for f in record["fields"]:
            out[f"{path}{f['name']}"] = f
            for branch in f["type"] if isinstance(f["type"], list) else [f["type"]]:
                if isinstance(branch, dict) and branch.get("type") == "record":
                    walk(branch, f"{path}{f['name']}.")

    walk(schema, "")
    return out


def _type_shape(t: Any) -> Any:
    """A field's type without namespaces and docs; a nested record by its name (its fields are compared apart)."""
    if isinstance(t, list):
        return [_type_shape(x) for x in t]
    if isinstance(t, dict):
        if t.get("type") == "record":
            return ("record", t["name"])
        return {k: _type_shape(v) for k, v in t.items() if k not in ("namespace", "doc", "default")}
    return t


def added_optional_fields(name: str, old: str, new: str) -> set[str]:
    """The fields (dotted paths) schema ``name`` at version ``new`` adds to version ``old``, after asserting that the
    change is one a minor version may make: every old field kept with its type (namespaces, docs and the version's
    own default aside), every added field optional (a union with null first, default null) and documented."""
    before, after = schema_fields(schemas.raw_schema(name, old)), schema_fields(schemas.raw_schema(name, new))
    assert set(before) <= set(after), sorted(set(before) - set(after))
    for path in before:
        assert _type_shape(before[path]["type"]) == _type_shape(after[path]["type"]), path
    added = set(after) - set(before)
    top = {p for p in added if not any(p.startswith(a + ".") for a in added)}
    for path in top:
        assert after[path].get("default", "missing") is None and after[path]["type"][0] == "null", path
        assert after[path]["doc"].strip(), path
    return top
