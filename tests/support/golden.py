"""Golden samples' JSON form: how a decoded record is written to and compared with ``tests/data/golden/*.json``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

__all__ = ["plain_json"]


def plain_json(value: Any) -> Any:
    """A record as plain JSON: datetimes (timestamp-millis) become epoch milliseconds, as Avro stores them."""
    if isinstance(value, datetime):
        return round(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_json(v) for v in value]
    return value
