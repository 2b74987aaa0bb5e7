"""Least privilege on PostgreSQL: the daemon's role reads and inserts its tables and can do nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from spectranet.streamer.app import build_daemon
from spectranet.streamer.config import load_settings
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.kafka_io import ensure_topics
from spectranet.streamer.tools.files import publish_files
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

from tests.support.common import SPECTRUM_FILES, unique_name

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon_role(database_url: str) -> Iterator[str]:
    """A login role with exactly the daemon's GRANTs on a migrated database; returns its URL."""
    role = unique_name("daemon").replace("-", "_")
    owner = sa.create_engine(database_url)
    db.upgrade(database_url)
    with owner.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'"))
    db.grant_least_privilege(owner, role)
    owner.dispose()
    url = make_url(database_url).set(username=role, password=f"pw-{role}")
    yield url.render_as_string(hide_password=False)
    with sa.create_engine(database_url).begin() as conn:
        conn.execute(sa.text(f"DROP OWNED BY {role}"))
        conn.execute(sa.text(f"DROP ROLE {role}"))


def test_the_daemon_runs_with_least_privilege(kafka, daemon_role: str, topic_prefix: str) -> None:
    settings = load_settings(
        kafka={"bootstrap_servers": kafka.bootstrap_servers, "group_id": f"{topic_prefix}-g",
               "input_topics": [f"{topic_prefix}-in"], "output_topic": f"{topic_prefix}-out",
               "session_timeout_ms": 6000},
        database={"url": daemon_role, "migrate_on_start": False}, batch={"max_packets": 8, "max_wait_s": 0.5})
    k = settings.kafka
    ensure_topics(k, [*k.input_topics, k.output_topic, k.dead_letter_topic])
    n, _ = publish_files(SPECTRUM_FILES[:10], topic=k.input_topics[0], bootstrap_servers=kafka.bootstrap_servers)
    stats = build_daemon(settings, serve_metrics=False).run(max_messages=n, idle_timeout_s=60)
    assert stats.classified == 10
    with sa.create_engine(daemon_role).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM latest_classification_per_object")).scalar_one() >= 1


@pytest.mark.parametrize("statement", [
    "DELETE FROM classifications",
    "UPDATE classifications SET top_class = 'Ia'",
    "DROP TABLE dead_letters",
    "CREATE TABLE intruder (x int)",
    "TRUNCATE spectra",
    "INSERT INTO alembic_version VALUES ('9999')",
])
def test_forbidden_statements_are_refused(daemon_role: str, statement: str) -> None:
    engine = sa.create_engine(daemon_role)
    with pytest.raises(ProgrammingError, match="permission denied|must be owner"):
        with engine.begin() as conn:
            conn.execute(sa.text(statement))
    engine.dispose()


def test_migrations_need_the_owner(daemon_role: str) -> None:
    with pytest.raises(ProgrammingError):
        db.downgrade(daemon_role, "base")  # dropping the tables: refused
