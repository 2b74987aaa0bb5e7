"""What the support modules share: the test data, the "no backend here" error, unique names, the Docker check and
start-up timing of the back-ends."""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from spectranet.streamer.errors import InfrastructureError

__all__ = ["DATA", "SPECTRUM_FILES", "ServiceUnavailable", "no_stop", "timed", "unique_name", "why_no_docker"]

DATA = Path(__file__).resolve().parents[1] / "data"
SPECTRUM_FILES = sorted(str(p) for p in (DATA / "spectra").glob("*.txt"))  # 200 real spectra the model's grid covers

_Service = TypeVar("_Service")


class ServiceUnavailable(InfrastructureError):
    """No backend for a service exists on this machine; the message lists what was tried and how to provide one."""


def no_stop() -> None:
    """The ``stop`` of a service this session did not start."""


def timed(start: Callable[[], _Service]) -> _Service:
    """Call ``start`` and return the frozen service dataclass it made with ``startup_s`` set to how long it took."""
    started = time.monotonic()
    service: Any = start()
    return dataclasses.replace(service, startup_s=time.monotonic() - started)


def unique_name(prefix: str) -> str:
    """``prefix`` plus a random suffix: a valid, unquoted PostgreSQL identifier and Kafka topic name."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", prefix) or len(prefix) > 40:
        raise ValueError(f"prefix must be lower-case letters, digits and _, at most 40 long: {prefix!r}")
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def why_no_docker() -> str | None:
    """None when testcontainers can start containers here, else why not."""
    try:
        import docker
        import testcontainers  # noqa: F401
    except ImportError:
        return "testcontainers is not installed"
    try:
        docker.from_env().ping()
    except (docker.errors.DockerException, OSError) as exc:  # requests' errors are OSErrors
        return f"no Docker daemon answers ({type(exc).__name__})"
    return None
