"""docs/schemas.md is generated from the .avsc files (``python -m spectranet.schemas.docs``), never written by hand."""

from __future__ import annotations

from pathlib import Path

from spectranet.schemas import ANNOTATED_SPECTRUM, SPECTRUM_PACKET, raw_schema, versions
from spectranet.schemas.docs import render

DOCS = Path(__file__).resolve().parents[1] / "docs" / "schemas.md"


def test_committed_docs_equal_generated_output() -> None:
    assert DOCS.read_text() == render(), "docs/schemas.md is stale: python -m spectranet.schemas.docs > docs/schemas.md"


def _records(t: object) -> list[dict]:
    if isinstance(t, list):
        return [r for x in t for r in _records(x)]
    if isinstance(t, dict):
        found = [t] if t.get("type") == "record" else []
        for key in ("fields", "items", "values", "type"):
            found += (_records(t.get(key)) if key != "fields"
                      else [r for f in t.get("fields", []) for r in _records(f["type"])])
        return found
    return []


def test_every_field_of_every_record_is_documented() -> None:
    text = render()
    for version in versions():
        for name in (SPECTRUM_PACKET, ANNOTATED_SPECTRUM):
            for record in _records(raw_schema(name, version)):
                section = text.split(f"#### {record['name']}\n", 1)[1].split("\n#### ", 1)[0]
                for field in record["fields"]:
                    assert f"| `{field['name']}` |" in section, (version, record["name"], field["name"])
