"""Avro framing: bytes on the wire <-> packet dicts in the reader schema.

Three framings are accepted on input, sniffed from the first bytes:

* ``container`` — a one-record Avro object container file (the ZTF convention; starts with ``Obj\\x01``); the writer
  schema is inside the message.
* ``confluent`` — magic byte 0, a big-endian 4-byte schema id, then schemaless Avro; the writer schema comes from a
  schema registry or from the bundled schemas.
* ``schemaless`` — plain Avro body written with the bundled schema of the version its first field names (every record
  starts with ``schema_version``); a version this code does not bundle is read with the reader schema.

Whatever the writer schema, decoding resolves it to the reader schema (the bundled latest), so downstream code sees
one shape: a 1.0 record read as 1.1 gets 1.1's defaults, a 1.1 record read as 1.0 loses the fields 1.0 lacks.
Encoding writes schemaless by default and the Confluent format on request.

For the bytes it is given, ``Codec.decode`` raises nothing but ``DecodeError`` (naming the packet's coordinates when
the caller passes them): whatever the Avro reader raises (truncation, schema mismatch, a ``timestamp-millis`` outside
Python's dates, ...) is the packet's fault. A schema registry that does not answer is not: ``InfrastructureError``.
"""

from __future__ import annotations

import io
import json
import struct
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, Protocol

import fastavro
import spectranet.schemas as schemas
from spectranet.streamer.errors import DecodeError, InfrastructureError

__all__ = [
    "Framing",
    "SchemaResolver",
    "BundledSchemas",
    "RegistrySchemas",
    "Codec",
    "sniff_framing",
]

Framing = Literal["schemaless", "confluent", "container"]
_CONTAINER_MAGIC = b"Obj\x01"
_CONFLUENT_HEADER = struct.Struct(">bI")


class SchemaResolver(Protocol):
    """Maps a Confluent schema id to a parsed writer schema (and back, for encoding)."""

    def schema(self, schema_id: int) -> dict[str, Any]: ...

    def schema_id(self, name: str, version: str) -> int: ...


@dataclass(frozen=True)
class BundledSchemas:
    """Schema ids served from the bundled .avsc files, for deployments without a registry.

    The ids must agree between producer and consumer; the defaults give each bundled (name, version) a fixed id.
    """

    ids: Mapping[int, tuple[str, str]] = field(default_factory=lambda: dict(schemas.BUNDLED_SCHEMA_IDS))

    def schema(self, schema_id: int) -> dict[str, Any]:
        try:
            name, version = self.ids[schema_id]
        except KeyError:
            raise DecodeError(f"unknown schema id {schema_id} (bundled ids: {sorted(self.ids)})",
                              field="schema_id") from None
        return schemas.load_schema(name, version)

    def schema_id(self, name: str, version: str) -> int:
        for sid, nv in self.ids.items():
            if nv == (name, version):
                return sid
        raise KeyError(f"no bundled schema id for {name} {version}")


class RegistrySchemas:
    """A Confluent-compatible schema registry (``GET /schemas/ids/{id}``, ``POST /subjects/{s}/versions``)."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self._url = url.rstrip("/")
        self._timeout = timeout_s
        self._by_id: dict[int, dict[str, Any]] = {}
        self._ids: dict[tuple[str, str], int] = {}

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self._url + path,
            data=data,
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
            method="GET" if body is None else "POST",
        )
        with urllib.request.urlopen(req, timeout=self._timeout) as resp:
            reply: dict[str, Any] = json.loads(resp.read())
            return reply

    def schema(self, schema_id: int) -> dict[str, Any]:
        if schema_id not in self._by_id:
            try:
                reply = self._request(f"/schemas/ids/{schema_id}")
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise DecodeError(f"schema id {schema_id} not in the registry", field="schema_id") from exc
                raise InfrastructureError(f"schema registry {self._url} answered {exc.code} for schema id "
                                          f"{schema_id}") from exc
            except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, a reply that is not JSON
                raise InfrastructureError(f"schema registry {self._url} unreachable: {exc}") from exc
            try:
                parsed = fastavro.parse_schema(json.loads(reply["schema"]))
            except Exception as exc:  # noqa: BLE001 - a writer schema the registry holds but Avro cannot parse
                raise DecodeError(f"schema id {schema_id} in the registry is not a valid Avro schema: {exc}",
                                  field="schema_id") from exc
            if not isinstance(parsed, dict):  # a bare type name or a union: no record can be written with it
                raise DecodeError(f"schema id {schema_id} in the registry is not an Avro record schema",
                                  field="schema_id")
            self._by_id[schema_id] = parsed
        return self._by_id[schema_id]

    def schema_id(self, name: str, version: str) -> int:
        key = (name, version)
        if key not in self._ids:
            subject = f"spectranet.{name}-value"
            body = {"schema": json.dumps(schemas.raw_schema(name, version))}
            self._ids[key] = int(self._request(f"/subjects/{subject}/versions", body)["id"])
        return self._ids[key]


@cache
def _bundled_versions() -> frozenset[str]:
    return frozenset(schemas.versions())


def sniff_framing(data: bytes) -> Framing:
    """Which framing ``data`` uses; container files and Confluent's magic byte are unambiguous enough."""
    if data.startswith(_CONTAINER_MAGIC):
        return "container"
    if len(data) >= 5 and data[0] == 0:
        # A schemaless packet starts with the length of schema_version ("1.1" -> 0x06), never with 0.
        return "confluent"
    return "schemaless"


class Codec:
    """Encode and decode one record type (spectrum packets or annotated spectra) in every framing."""

    def __init__(
        self,
        name: str,
        *,
        version: str | None = None,
        resolver: SchemaResolver | None = None,
        max_message_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.name = name
        self.version = version or schemas.latest_version()
        self.reader_schema = schemas.load_schema(name, self.version)
        self.resolver: SchemaResolver = resolver or BundledSchemas()
        self.max_message_bytes = max_message_bytes

    def decode(self, data: bytes | None, *, source: str | None = None) -> dict[str, Any]:
        """Bytes in any accepted framing -> a dict in the reader schema; ``DecodeError`` names what is wrong and,
        given ``source`` (the message's ``topic[partition]@offset``), which packet."""
        try:
            return self._decode(data)
        except DecodeError as exc:
            raise exc if source is None else exc.with_packet(source) from exc.__cause__

    def _decode(self, data: bytes | None) -> dict[str, Any]:
        if not data:
            raise DecodeError("empty message", field="value")
        if len(data) > self.max_message_bytes:
            raise DecodeError(f"message of {len(data)} bytes exceeds the limit of {self.max_message_bytes}",
                              field="value")
        framing = sniff_framing(data)
        try:
            if framing == "container":
                records = list(fastavro.reader(io.BytesIO(data), reader_schema=self.reader_schema))
                if len(records) != 1:
                    raise DecodeError(f"container holds {len(records)} records, expected exactly 1", field="value")
                record = records[0]
            else:
                buf = io.BytesIO(data)
                if framing == "confluent":
                    _, schema_id = _CONFLUENT_HEADER.unpack(buf.read(5))
                    writer = self.resolver.schema(schema_id)
                else:
                    writer = self._schemaless_writer(data)
                record = fastavro.schemaless_reader(buf, writer, self.reader_schema)
                if buf.tell() != len(data):
                    raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after the record", field="value")
        except (DecodeError, InfrastructureError):
            raise
        except MemoryError:
            raise  # the machine's, not the packet's
        except Exception as exc:  # noqa: BLE001 - every exception of the reader on these bytes is the bytes' fault
            # EOFError and struct.error for truncation, ValueError/TypeError/KeyError/IndexError/UnicodeDecodeError
            # for bad values, OverflowError for a timestamp outside Python's dates, fastavro's SchemaResolutionError.
            reason = str(exc) if len(str(exc)) <= 300 else str(exc)[:300] + "..."
            raise DecodeError(f"not a valid {self.name} in {framing} framing: {type(exc).__name__}: {reason}",
                              field="value") from exc
        if not isinstance(record, dict):
            raise DecodeError("decoded value is not a record", field="value")
        return record

    def _schemaless_writer(self, data: bytes) -> dict[str, Any]:
        """The bundled schema of the version a schemaless record names in its first field (``schema_version``, an
        Avro string: zig-zag varint length, then UTF-8), or the reader schema when it names none this code bundles."""
        length, shift, pos = 0, 0, 0
        while pos < min(len(data), 3):  # a version string is short: its length fits in one or two varint bytes
            byte = data[pos]
            length |= (byte & 0x7F) << shift
            shift, pos = shift + 7, pos + 1
            if not byte & 0x80:
                break
        else:
            return self.reader_schema
        n = length >> 1 if not length & 1 else -1  # zig-zag decoded; negative lengths are not strings
        version = data[pos:pos + n].decode("ascii", errors="replace") if 0 < n <= 16 else ""
        if version == self.version or version not in _bundled_versions():
            return self.reader_schema
        return schemas.load_schema(self.name, version)

    def encode(self, record: Mapping[str, Any], *, framing: Framing = "schemaless") -> bytes:
        """A dict -> bytes; fastavro validates types and raises ``ValueError``/``TypeError`` naming the field."""
        buf = io.BytesIO()
        if framing == "confluent":
            buf.write(_CONFLUENT_HEADER.pack(0, self.resolver.schema_id(self.name, self.version)))
            fastavro.schemaless_writer(buf, self.reader_schema, dict(record))
        elif framing == "container":
            # The .avsc as written, not the parsed schema: fastavro orders a parsed schema's keys by set iteration,
            # so its header (the embedded writer schema) would change with PYTHONHASHSEED.
            fastavro.writer(buf, schemas.raw_schema(self.name, self.version), [dict(record)], codec="null")
        else:
            fastavro.schemaless_writer(buf, self.reader_schema, dict(record))
        return buf.getvalue()
