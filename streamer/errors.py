"""The project's exception hierarchy, in one place.

Two families matter to the daemon: ``PacketError`` means *this packet* is bad (dead-letter it, carry on);
``InfrastructureError`` means the world is broken (retry, never commit, never dead-letter).
"""

from __future__ import annotations


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
            where.append(f"packet {packet_id!r}")
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


class SpectrumFileError(SpectraNetError):
    """A spectrum file that cannot be read (produce, classify)."""


class CheckpointError(SpectraNetError):
    """A model checkpoint that is missing, corrupt, or incompatible with this code."""


class ConfigError(SpectraNetError):
    """Conflicting or invalid configuration."""


class InfrastructureError(SpectraNetError):
    """Broker or database unavailable: retried with backoff, never dead-lettered."""
