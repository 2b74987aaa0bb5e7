"""The Avro contract: golden packets in every framing, schema evolution, and clear decode errors.

Every schema of every version (golden samples, namespaces, field docs): tests/test_schema_versions.py.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spectranet.streamer.contract.codec import BundledSchemas, Codec, Framing, RegistrySchemas, sniff_framing
from spectranet.streamer.errors import DecodeError

from tests.support.harness import evolved_schema

GOLDEN = Path(__file__).parent / "data" / "golden"
FRAMINGS: tuple[Framing, ...] = ("schemaless", "confluent", "container")


def expected_packet() -> dict:
    record = json.loads((GOLDEN / "spectrum_packet_v1_0.json").read_text())
    record["produced_at"] = datetime.fromtimestamp(record["produced_at"] / 1000, tz=timezone.utc)
    return record


@pytest.mark.parametrize("framing", FRAMINGS)
def test_golden_packets_decode_to_the_reader_schema(framing: str) -> None:
    data = (GOLDEN / f"spectrum_packet_v1_0.{framing}.avro").read_bytes()
    assert sniff_framing(data) == framing
    assert Codec("spectrum_packet").decode(data) == expected_packet()


@pytest.mark.parametrize("framing", FRAMINGS)
def test_encode_decode_round_trip(framing: Framing) -> None:
    codec = Codec("spectrum_packet")
    packet = expected_packet()
    assert codec.decode(codec.encode(packet, framing=framing)) == packet


def test_schemaless_encoding_is_the_default_and_stable() -> None:
    codec = Codec("spectrum_packet")
    golden = (GOLDEN / "spectrum_packet_v1_0.schemaless.avro").read_bytes()
    assert codec.encode(expected_packet()) == golden


@pytest.mark.parametrize("extra_field", [True, False])
def test_other_minor_versions_resolve_to_the_reader_schema(extra_field: bool) -> None:
    writer = evolved_schema(extra_field)
    packet = expected_packet()
    if extra_field:
        packet_w = {**packet, "airmass": 1.2}
    else:
        packet_w = {k: v for k, v in packet.items() if k != "exptime"}
    # Container framing carries its writer schema.
    buf = io.BytesIO()
    fastavro.writer(buf, writer, [packet_w])
    decoded = Codec("spectrum_packet").decode(buf.getvalue())
    assert "airmass" not in decoded
    assert decoded["exptime"] == (packet["exptime"] if extra_field else None)
    # Confluent framing: writer schema looked up by id.
    resolver = BundledSchemas(ids={7: ("spectrum_packet", "1.0")})
    body = io.BytesIO()
    body.write(struct.pack(">bI", 0, 42))
    fastavro.schemaless_writer(body, writer, packet_w)

    class OneSchema:
        def schema(self, schema_id: int) -> dict:
            assert schema_id == 42
            return writer

        def schema_id(self, name: str, version: str) -> int:
            return resolver.schema_id(name, version)

    decoded = Codec("spectrum_packet", resolver=OneSchema()).decode(body.getvalue())
    assert "airmass" not in decoded and decoded["spectrum_id"] == packet["spectrum_id"]


@pytest.mark.parametrize("data, fragment", [
    (b"", "empty"),
    (b"\x06abc", "not a valid"),
    (b"\x00\x00\x00\x00\x63" + b"\x06", "unknown schema id 99"),
    (b"Obj\x01garbage", "not a valid"),
])
def test_bad_bytes_raise_decode_error_naming_the_problem(data: bytes, fragment: str) -> None:
    with pytest.raises(DecodeError) as info:
        Codec("spectrum_packet").decode(data)
    assert fragment in str(info.value)
    assert info.value.field in {"value", "schema_id"}


@pytest.mark.parametrize("cut", [1, 10, 100, 1000, -1])
def test_truncated_packets_are_decode_errors(cut: int) -> None:
    data = (GOLDEN / "spectrum_packet_v1_0.schemaless.avro").read_bytes()
    with pytest.raises(DecodeError):
        Codec("spectrum_packet").decode(data[:cut])


def test_trailing_bytes_are_rejected() -> None:
    data = (GOLDEN / "spectrum_packet_v1_0.schemaless.avro").read_bytes()
    with pytest.raises(DecodeError, match="trailing"):
        Codec("spectrum_packet").decode(data + b"\x00\x01")


def test_oversized_message_is_rejected_before_decoding() -> None:
    with pytest.raises(DecodeError, match="exceeds the limit"):
        Codec("spectrum_packet", max_message_bytes=100).decode(b"\x06" * 101)


@pytest.mark.parametrize("produced_at", [2**62, -(2**62), 253_402_300_800_000])
def test_reader_exceptions_become_decode_errors_naming_the_packet(produced_at: int) -> None:
    """fastavro raises OverflowError for a timestamp-millis outside Python's dates: still the packet's fault."""
    codec = Codec("spectrum_packet")
    data = codec.encode({**expected_packet(), "produced_at": produced_at})
    with pytest.raises(DecodeError) as info:
        codec.decode(data, source="spectra[0]@7")
    assert info.value.packet_id == "spectra[0]@7" and info.value.field == "value"
    assert "OverflowError" in str(info.value) and "spectra[0]@7" in str(info.value)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([b"", b"\x00\x00\x00\x00\x01", b"\x00\x00\x00\x00\x02", b"Obj\x01",
                                                 b"\x06"]))
def test_the_codec_raises_nothing_but_decode_errors(data: bytes, prefix: bytes) -> None:
    try:
        Codec("spectrum_packet").decode(prefix + data, source="t[0]@1")
    except DecodeError as exc:
        assert exc.packet_id == "t[0]@1"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       st.sampled_from(FRAMINGS))
def test_corrupted_packets_raise_nothing_but_decode_errors(flips: list[tuple[int, int]], framing: str) -> None:
    data = bytearray((GOLDEN / f"spectrum_packet_v1_0.{framing}.avro").read_bytes())
    for pos, byte in flips:
        data[pos % len(data)] = byte
    try:
        Codec("spectrum_packet").decode(bytes(data))
    except DecodeError:
        pass


def _serve_registry(schemas_by_id: dict[int, str]) -> tuple[ThreadingHTTPServer, str]:
    """A local HTTP server answering ``GET /schemas/ids/{id}`` as a Confluent schema registry does (404 if unknown)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
            schema_id = int(self.path.rsplit("/", 1)[-1])
            found = schema_id in schemas_by_id
            body = json.dumps({"schema": schemas_by_id[schema_id]} if found else {"error_code": 40403}).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's signature
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_a_registry_schema_that_is_not_a_record_is_a_decode_error_naming_the_id() -> None:
    record = {"type": "record", "name": "r", "fields": [{"name": "x", "type": "int"}]}
    server, url = _serve_registry({1: json.dumps(record), 2: json.dumps("string"), 3: "{not json"})
    try:
        registry = RegistrySchemas(url)
        assert registry.schema(1)["name"] == "r"
        for schema_id, message in ((2, "not an Avro record schema"), (3, "not a valid Avro schema"),
                                   (4, "not in the registry")):
            with pytest.raises(DecodeError, match=f"schema id {schema_id} .*{message}") as info:
                registry.schema(schema_id)
            assert info.value.field == "schema_id"
    finally:
        server.shutdown()
        server.server_close()
