"""The project's exception hierarchy, in one place.

Two families matter to the daemon: ``PacketError`` means *this packet* is bad (dead-letter it, carry on);
``InfrastructureError`` means the world is broken (retry, never commit, never dead-letter). Exceptions raised by
libraries (the Avro reader, the database driver, the Kafka client) are sorted into these two by one function,
``spectranet.streamer.runtime.classifier.whose_fault``.
"""

from __future__ import annotations

_SHOWN_ID_CHARS = 100  # a hostile packet id can be megabytes long: errors, logs and headers show its start


def shown(text: str, limit: int = _SHOWN_ID_CHARS) -> str:
    """``repr(text)`` (control characters escaped), cut to ``limit`` characters with the full length said."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class SpectraNetError(Exception):
    """Base class of every error this project raises on purpose."""


class PacketError(SpectraNetError):
    """A packet or spectrum that cannot be used; the message names the field and the packet."""

    def __init__(self, message: str, *, field: str | None = None, packet_id: str | None = None) -> None:
        self.field = field
        self.packet_id = packet_id
        self.reason = message
        where = []
        if packet_id is not None:
            where.append(f"packet {shown(packet_id)}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def with_packet(self, packet_id: str) -> "PacketError":
        """Return the same error naming ``packet_id`` (preprocessing does not know which packet it works on)."""
        if self.packet_id is not None:
            return self
        err = type(self)(self.reason, field=self.field, packet_id=packet_id)
        err.__cause__ = self.__cause__
        return err


class DecodeError(PacketError):
    """Bytes that are not a spectrum packet in any accepted framing."""


class ValidationError(PacketError):
    """A decoded packet whose contents break the contract (lengths, ranges, units)."""


class PreprocessError(PacketError):
    """A valid packet whose spectrum cannot be put on the model grid."""


class TooFewPixelsError(PreprocessError):
    """Fewer usable pixels than the model needs."""


class NoOverlapError(PreprocessError):
    """The spectrum does not overlap the model's wavelength grid."""


class LengthMismatchError(PreprocessError):
    """Arrays that should be parallel have different lengths."""


class NonPositiveWavelengthError(PreprocessError):
    """Wavelengths must be strictly positive."""


class UnitError(PreprocessError):
    """A unit string astropy does not know, or of the wrong physical type."""


class InferenceError(PacketError):
    """The model failed on this one spectrum (isolated by splitting its batch)."""


class StorageError(PacketError):
    """The database refused this packet's rows for a reason in the data (a value too long, a character it cannot
    hold) that validation did not foresee; the batch is split until the row is alone, and only it is dead-lettered."""


class PublishError(PacketError):
    """The broker refused this packet's outgoing message for what it is (too large), not for being unavailable."""


class ProcessingError(PacketError):
    """An unforeseen exception while processing this one packet (decode to annotation: no I/O, so a retry would fail
    the same way). The packet is dead-lettered with the exception's type and message and the stream goes on; the
    exception is logged with its traceback, and deserves a bug report."""


class SpectrumFileError(SpectraNetError):
    """A spectrum file that cannot be read (produce, classify)."""


class CheckpointError(SpectraNetError):
    """A model checkpoint that is missing, corrupt, or incompatible with this code."""


class ConfigError(SpectraNetError):
    """Conflicting or invalid configuration."""


class InfrastructureError(SpectraNetError):
    """Broker or database unavailable: retried with backoff, never dead-lettered."""
