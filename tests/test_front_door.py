"""The front door (issue 15): what a newcomer reads when the broker or the database is not there.

Without a broker, ``spectranet run`` used to print librdkafka's "Connection refused" line about 13 times a second and
``spectranet produce`` hung; a wrong database URL ended in a traceback. Here: one clear line naming the setting, raw
repeats rate-limited, ``produce`` gives up after ``--timeout`` with the count not delivered, ``/readyz`` says not ready,
and ``spectranet check`` prints one line per check against the real Kafka and PostgreSQL.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import KafkaError
from spectranet.streamer.app import build_daemon, readiness_follows_broker
from spectranet.streamer.config import load_settings
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.kafka_io import KafkaWatch, ensure_topics
from spectranet.streamer.runtime.logs import RateLimitFilter, describe_database_error
from spectranet.streamer.runtime.metrics import HealthServer, Metrics
from spectranet.streamer.tools.embedded import free_port
from sqlalchemy.engine import make_url

from tests.support.common import unique_name
from tests.support.postgres import PostgresService

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(str(p) for p in (ROOT / "streamer" / "samples").glob("PTF*.txt"))[:3]
CLI = [sys.executable, "-m", "spectranet.streamer.cli"]
KAFKA_SETTING = "kafka.bootstrap_servers / SPECTRANET_KAFKA__BOOTSTRAP_SERVERS"
DATABASE_SETTING = "database.url / SPECTRANET_DATABASE__URL"
SECRET = "pw-must-not-appear-7f3a"


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment of a CLI run: no SPECTRANET_*/KAFKA_* from the caller, a SQLite file, a free metrics port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECTRANET_", "KAFKA_"))}
    env.update({"SPECTRANET_DATABASE__URL": f"sqlite:///{tmp_path / 'front-door.sqlite'}",
                "SPECTRANET_METRICS__PORT": "0"})
    env.update(settings)
    return env


def _closed_port() -> str:
    return f"127.0.0.1:{free_port()}"  # free now: nothing listens there


def _run_until(args: list[str], env: dict[str, str], cwd: Path, *, seen: str, then_s: float,
               timeout_s: float = 120.0) -> str:
    """Run the CLI until ``seen`` appears in its output, ``then_s`` seconds more, then SIGTERM; the whole output."""
    log = cwd / "cli.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*CLI, *args], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout_s
            while seen not in log.read_text():
                assert proc.poll() is None, f"exited {proc.returncode} before saying {seen!r}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"{seen!r} not said within {timeout_s} s:\n{log.read_text()}"
                time.sleep(0.2)
            time.sleep(then_s)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return log.read_text()


# --- without services -------------------------------------------------------------------------------------------

def test_run_without_a_broker_says_so_once(tmp_path: Path) -> None:
    broker = _closed_port()
    output = _run_until(["run"], _env(tmp_path, SPECTRANET_KAFKA__BOOTSTRAP_SERVERS=broker), tmp_path,
                        seen="unreachable", then_s=6.0)
    clear = [line for line in output.splitlines() if "unreachable" in line]
    assert len(clear) == 1, output
    assert f"Kafka broker {broker} unreachable" in clear[0] and KAFKA_SETTING in clear[0], clear
    assert "spectranet demo" in clear[0]  # what to do
    raw = [line for line in output.splitlines() if "rdkafka#" in line]
    assert len(raw) <= 3, f"{len(raw)} raw librdkafka lines in ~6 s (was ~13 a second before issue 15):\n{output}"
    assert "Traceback" not in output


def test_produce_without_a_broker_gives_up_with_the_count(tmp_path: Path) -> None:
    broker = _closed_port()
    started = time.monotonic()
    proc = subprocess.run([*CLI, "produce", *SAMPLES, "--topic", "spectra", "--timeout", "3"], cwd=tmp_path,
                          env=_env(tmp_path, SPECTRANET_KAFKA__BOOTSTRAP_SERVERS=broker), capture_output=True,
                          text=True, timeout=120)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    # 3 s of timeout plus interpreter and torch start-up; before issue 15 it waited at least 60 s.
    assert elapsed < 45, f"took {elapsed:.0f} s:\n{output}"
    final = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(final) == 1, output
    assert f"{len(SAMPLES)} of {len(SAMPLES)} packets not delivered to 'spectra' within 3 s" in final[0], final
    assert f"Kafka broker {broker} unreachable" in final[0] and KAFKA_SETTING in final[0], final
    assert sum("rdkafka#" in line for line in output.splitlines()) <= 3, output


@pytest.mark.parametrize("command", [["run"], ["db", "upgrade"], ["db", "grant", "--role", "spectranet_daemon"],
                                     ["dlq", "list"]])
def test_without_a_database_commands_say_so_in_one_line_without_the_password(tmp_path: Path,
                                                                             command: list[str]) -> None:
    url = f"postgresql+psycopg://spectranet:{SECRET}@{_closed_port()}/spectranet"
    proc = subprocess.run([*CLI, *command], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=_env(tmp_path, SPECTRANET_DATABASE__URL=url,
                                   SPECTRANET_KAFKA__BOOTSTRAP_SERVERS=_closed_port()))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert SECRET not in output
    lines = [line for line in output.splitlines() if DATABASE_SETTING in line]
    assert len(lines) == 1 and "unreachable" in lines[0] and "spectranet:***@" in lines[0], output
    assert "Traceback" not in output


def test_repeats_are_rate_limited_with_a_count() -> None:
    limit = RateLimitFilter(0.3)
    logger = logging.getLogger("tests.front_door.rate_limit")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    logger.addFilter(limit)
    logger.propagate = False
    try:
        for i in range(50):  # librdkafka's timings differ between repeats; they are the same message
            logger.error("Connect to ipv4#127.0.0.1:9 failed: Connection refused (after %dms in state CONNECT)", i % 3)
        logger.error("another condition")
        time.sleep(0.35)
        logger.error("Connect to ipv4#127.0.0.1:9 failed: Connection refused (after 0ms in state CONNECT)")
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(limit)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 3, messages
    assert messages[1] == "another condition"
    assert messages[2].endswith("(49 repeats suppressed in the last 0 s)"), messages


def test_readiness_follows_the_broker(tmp_path: Path) -> None:
    """In addition to the daemon test below: the watch's transitions drive /readyz both ways over real HTTP."""
    health = HealthServer(Metrics(), host="127.0.0.1", port=0).start()
    try:
        watch = KafkaWatch(bootstrap_servers="127.0.0.1:9", on_change=readiness_follows_broker(health), logger=None)
        health.ready.set()  # what the daemon does once subscribed
        assert _readyz(health.port) == 200
        watch.error_cb(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        assert _readyz(health.port) == 503
        watch.stats_cb('{"brokers": {"127.0.0.1:9/bootstrap": {"state": "INIT"}}}')
        assert _readyz(health.port) == 503
        watch.stats_cb('{"brokers": {"127.0.0.1:9/1": {"state": "UP"}}}')
        assert _readyz(health.port) == 200
    finally:
        health.stop()


def test_database_problems_name_the_setting_never_the_password() -> None:
    url = f"postgresql+psycopg://daemon:{SECRET}@db.example:5432/spectranet"
    refused = describe_database_error(RuntimeError(f"connection failed: Connection refused ({SECRET})"), url)
    assert str(refused).startswith("database postgresql+psycopg://daemon:***@db.example:5432/spectranet unreachable")
    wrong = describe_database_error(RuntimeError('FATAL: password authentication failed for user "daemon"'), url,
                                    from_file=True)
    assert "refused the password of user 'daemon'" in str(wrong) and "database.url_file" in str(wrong)
    for problem in (refused, wrong):
        assert SECRET not in str(problem) and DATABASE_SETTING in str(problem)


def _readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_readyz_is_503_while_the_broker_is_unreachable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(kafka={"bootstrap_servers": _closed_port()},
                             database={"url": f"sqlite:///{tmp_path / 'r.sqlite'}"},
                             metrics={"host": "127.0.0.1", "port": 0})
    daemon = build_daemon(settings)
    assert daemon.health is not None
    stop = threading.Event()
    caplog.set_level(logging.INFO)
    worker = threading.Thread(target=daemon.run, args=(stop,), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while "unreachable" not in caplog.text:  # the consumer is subscribed and has polled
            assert time.monotonic() < deadline and worker.is_alive(), caplog.text
            time.sleep(0.1)
        # The daemon set "ready" when it subscribed; the broker being unreachable must keep it not ready.
        for _ in range(10):
            assert _readyz(daemon.health.port) == 503
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not worker.is_alive()


# --- against the real services ----------------------------------------------------------------------------------

@pytest.fixture
def password_role(postgres: PostgresService, database_url: str) -> Iterator[str]:
    """A role that must give its password, on the session's real PostgreSQL; yields its name.

    The local test cluster trusts every connection (initdb --auth=trust), so for this one role a pg_hba.conf line
    that asks for the password goes first, and comes out again afterwards (other roles are not affected).
    """
    role = unique_name("pw").replace("-", "_")
    admin = make_url(postgres.dsn).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'right-{SECRET}'")
        hba_file = conn.execute("SHOW hba_file").fetchone()
        assert hba_file is not None
        hba = Path(hba_file[0])
    wrong = make_url(database_url).set(drivername="postgresql", username=role, password=SECRET)
    original = None
    if _connects(wrong.render_as_string(hide_password=False)):
        if not os.access(hba, os.W_OK):
            pytest.skip(f"this PostgreSQL accepts any password and its {hba} is not ours to change")
        original = hba.read_text()
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n{original}")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while _connects(wrong.render_as_string(hide_password=False)):
            assert time.monotonic() < deadline, "pg_hba.conf reload did not take effect"
            time.sleep(0.1)
    try:
        yield role
    finally:
        if original is not None:
            hba.write_text(original)
        with psycopg.connect(admin, autocommit=True) as conn:
            if original is not None:
                conn.execute("SELECT pg_reload_conf()")
            conn.execute(f"DROP ROLE {role}")


def _connects(conninfo: str) -> bool:
    try:
        with psycopg.connect(conninfo, connect_timeout=5):
            return True
    except psycopg.OperationalError:
        return False


@pytest.mark.integration
def test_wrong_database_password_is_one_line_without_it(database_url: str, password_role: str,
                                                        tmp_path: Path) -> None:
    url = make_url(database_url).set(username=password_role, password=SECRET).render_as_string(hide_password=False)
    proc = subprocess.run([*CLI, "run"], cwd=tmp_path, env=_env(tmp_path, SPECTRANET_DATABASE__URL=url,
                                                                 SPECTRANET_KAFKA__BOOTSTRAP_SERVERS=_closed_port()),
                          capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert SECRET not in output
    lines = [line for line in output.splitlines() if DATABASE_SETTING in line]
    assert len(lines) == 1, output
    assert f"refused the password of user '{password_role}'" in lines[0], lines
    assert "Traceback" not in output


@pytest.mark.integration
def test_check_against_real_kafka_and_postgresql(kafka, database_url: str, topic_prefix: str,
                                                 tmp_path: Path) -> None:
    settings = load_settings(kafka={"bootstrap_servers": kafka.bootstrap_servers,
                                    "input_topics": [f"{topic_prefix}-in"], "output_topic": f"{topic_prefix}-out",
                                    "group_id": f"{topic_prefix}-g"},
                             database={"url": database_url, "migrate_on_start": False})
    k = settings.kafka
    ensure_topics(k, [*k.input_topics, k.output_topic])  # not the dead-letter topic, yet
    db.upgrade(database_url)
    env = _env(tmp_path, SPECTRANET_KAFKA__BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
               SPECTRANET_KAFKA__INPUT_TOPICS=f'["{topic_prefix}-in"]',
               SPECTRANET_KAFKA__OUTPUT_TOPIC=f"{topic_prefix}-out", SPECTRANET_KAFKA__GROUP_ID=f"{topic_prefix}-g",
               SPECTRANET_DATABASE__URL=database_url, SPECTRANET_DATABASE__MIGRATE_ON_START="false")

    missing = subprocess.run([*CLI, "check", "--timeout", "20"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=180)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    failed = [line for line in missing.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == [f"FAIL kafka topic {k.dead_letter_topic}: dead-letter topic '{k.dead_letter_topic}' does not "
                      f"exist (kafka.dlq_topic / SPECTRANET_KAFKA__DLQ_TOPIC) -> create it (kafka-topics.sh --create "
                      f"--topic {k.dead_letter_topic}) or set another"], missing.stdout

    ensure_topics(k, [k.dead_letter_topic])
    ok = subprocess.run([*CLI, "check", "--timeout", "20"], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=180)
    lines = ok.stdout.splitlines()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    checks = [line.split(":", 1)[0] for line in lines]
    assert checks == ["OK config", "OK kafka broker", f"OK kafka topic {topic_prefix}-in",
                      f"OK kafka topic {topic_prefix}-out", f"OK kafka topic {k.dead_letter_topic}", "OK kafka ACLs",
                      "OK database", "OK database schema", "OK database privileges", "OK model",
                      "OK template bank"], ok.stdout
    assert "environment sets" in lines[0] and "database.url" in lines[0]
    assert f"{kafka.bootstrap_servers} reachable" in lines[1]
    assert "at head" in lines[7] and "verified" in lines[9]
    password = make_url(database_url).password
    assert not password or password not in ok.stdout
