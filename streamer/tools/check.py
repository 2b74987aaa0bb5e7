"""``spectranet check``: is everything the daemon needs there and usable? One line per check, like ``pg_isready``.

Each line is ``OK|FAIL <check>: <detail> [-> fix]``; the command exits 0 only if every check passes. Checks, in order
(a check that cannot run because an earlier one failed is left out, not reported as a second failure):

- ``config``: the settings load; which keys come from the config file and which from the environment (names only,
  never values, so no secret is shown).
- ``kafka broker``: the bootstrap servers answer (metadata within ``timeout_s``), with the admin client and the same
  security properties as the daemon.
- ``kafka topic <name>``: each input topic, the output topic and the dead-letter topic exists.
- ``kafka ACLs``: the broker says this principal may READ the input topics and the consumer group and WRITE the output
  and dead-letter topics (KIP-430 authorized operations, asked with ``include_authorized_operations``). A broker that
  does not report them is said to be "not checkable", which passes.
- ``database``: a connection succeeds (the URL is shown with its password as ``***``).
- ``database schema``: Alembic's revision is the head, or the daemon will upgrade it (``database.migrate_on_start``).
- ``database privileges``: the daemon's role may SELECT and INSERT its tables and SELECT the views (PostgreSQL's
  ``has_table_privilege``), and CREATE in its schema when it migrates on start; for SQLite, the file is writable.
- ``model``: the checkpoint loads, its weights match the SHA-256 in its card, and they fit its config.
- ``template bank``: the bank ``model.templates`` names (the shipped one by default) loads and fits the model's grid,
  or refinement is off ("none"); a shipped bank that does not fit is a failure here, where the daemon would only warn
  and leave redshifts unrefined.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AclOperation, AdminClient
from spectranet.streamer.config import DatabaseSettings, KafkaSettings, ModelSettings, load_settings
from spectranet.streamer.errors import CheckpointError, ConfigError
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.kafka_io import KafkaWatch, make_admin
from spectranet.streamer.runtime.logs import Problem, describe_database_error, redacted_url, setting_names
from spectranet.streamer.science.checkpoint import default_checkpoint_path, load_checkpoint
from spectranet.streamer.science.inference import TEMPLATES_DEFAULT, TEMPLATES_OFF, check_bank_fits
from spectranet.streamer.science.templates import default_template_bank_path, load_template_bank
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

__all__ = ["CheckResult", "run_checks"]


@dataclass(frozen=True)
class CheckResult:
    check: str
    ok: bool
    detail: str
    fix: str | None = None

    @classmethod
    def passed(cls, check: str, detail: str) -> "CheckResult":
        return cls(check, True, detail)

    @classmethod
    def failed(cls, check: str, problem: Problem) -> "CheckResult":
        return cls(check, False, f"{problem.what} ({problem.setting})", problem.fix)

    def line(self) -> str:
        return f"{'OK' if self.ok else 'FAIL'} {self.check}: {self.detail}" + (f" -> {self.fix}" if self.fix else "")


def run_checks(*, config_file: Path | None = None, timeout_s: float = 10.0) -> Iterator[CheckResult]:
    """The checks, in order, each as soon as it is done (the broker check can take ``timeout_s``)."""
    try:
        settings = load_settings(config_file)
    except ConfigError as exc:
        yield CheckResult.failed("config", Problem(f"the settings do not load: {' '.join(str(exc).split())}",
                                                   _config_path(config_file) or "SPECTRANET_* variables",
                                                   "fix the named key"))
        return
    yield CheckResult.passed("config", _sources(config_file))
    yield from _kafka_checks(settings.kafka, timeout_s=timeout_s)
    yield from _database_checks(settings.database)
    model = _model_check(settings.model)
    yield model
    if model.ok:
        yield _template_bank_check(settings.model)


# --- configuration ----------------------------------------------------------------------------------------------

def _config_path(config_file: Path | None) -> str | None:
    path = config_file or os.environ.get("SPECTRANET_CONFIG")
    return str(path) if path else None


def _keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out += _keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _sources(config_file: Path | None) -> str:
    """Where the settings come from: key names per source, never values (``load_settings`` has read the file)."""
    parts = []
    path = _config_path(config_file)
    if path:
        text = Path(path).read_text()
        data = tomllib.loads(text) if path.endswith(".toml") else (yaml.safe_load(text) or {})
        parts.append(f"file {path} sets {', '.join(sorted(_keys(data))) or 'nothing'}")
    env = sorted(k[len("SPECTRANET_"):].lower().replace("__", ".") for k in os.environ
                 if k.upper().startswith("SPECTRANET_") and k.upper() != "SPECTRANET_CONFIG")
    env += sorted(f"kafka.client_properties.{k[len('KAFKA_'):].lower().replace('_', '.')}" for k in os.environ
                  if k.startswith("KAFKA_") and not k.endswith("_OPTS") and k != "KAFKA_HOME")
    if env:
        parts.append(f"environment sets {', '.join(env)}")
    if not parts:
        return "no config file, no SPECTRANET_* variables: defaults"
    return "; ".join(parts) + "; defaults for the rest"


# --- Kafka ------------------------------------------------------------------------------------------------------

def _kafka_checks(k: KafkaSettings, *, timeout_s: float) -> Iterator[CheckResult]:
    watch = KafkaWatch(bootstrap_servers=k.bootstrap_servers, logger=None)  # collect the problem, print it here
    admin = make_admin(k, watch=watch)
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        admin.poll(0)  # serve error_cb: it knows "connection refused" from "authentication failed"
        yield CheckResult.failed("kafka broker", watch.problem or Problem(
            f"Kafka broker {k.bootstrap_servers} unreachable: {exc.args[0].str()}",
            setting_names("kafka.bootstrap_servers"), "start a broker there or set it"))
        return
    yield CheckResult.passed("kafka broker", f"{k.bootstrap_servers} reachable: {len(metadata.brokers)} broker(s), "
                                             f"cluster {metadata.cluster_id}")
    roles = [(t, "input", "kafka.input_topics") for t in k.input_topics]
    roles += [(k.output_topic, "output", "kafka.output_topic"), (k.dead_letter_topic, "dead-letter", "kafka.dlq_topic")]
    present: dict[str, str] = {}
    for topic, role, key in roles:
        meta = metadata.topics.get(topic)
        error = meta.error if meta is not None else None
        if meta is None or (error is not None and error.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART,
                                                                    KafkaError._UNKNOWN_TOPIC)):
            yield CheckResult.failed(f"kafka topic {topic}", Problem(
                f"{role} topic {topic!r} does not exist", setting_names(key),
                f"create it (kafka-topics.sh --create --topic {topic}) or set another"))
        elif error is not None:
            yield CheckResult.failed(f"kafka topic {topic}", Problem(
                f"{role} topic {topic!r}: {error.str()}", setting_names(key),
                "grant this principal DESCRIBE on it" if error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
                else "see the broker's log"))
        else:
            present[topic] = role
            yield CheckResult.passed(f"kafka topic {topic}", f"{role}, {len(meta.partitions)} partition(s)")
    yield _acl_check(admin, k, present, timeout_s=timeout_s)


def _acl_check(admin: AdminClient, k: KafkaSettings, present: dict[str, str], *, timeout_s: float) -> CheckResult:
    """READ on the input topics and the group, WRITE on the others, as the broker reports them for this principal."""
    needed = [(f"topic {t}", AclOperation.READ if role == "input" else AclOperation.WRITE)
              for t, role in present.items()]
    allowed: dict[str, set[AclOperation] | None] = {}
    notes: list[str] = []
    try:
        if present:
            futures = admin.describe_topics(TopicCollection(list(present)), request_timeout=timeout_s,
                                            include_authorized_operations=True)
            for topic, future in futures.items():
                ops = future.result(timeout=timeout_s).authorized_operations
                allowed[f"topic {topic}"] = set(ops) if ops is not None else None
    except KafkaException as exc:
        return CheckResult.failed("kafka ACLs", Problem(f"the broker did not describe the topics: {exc.args[0].str()}",
                                                        "the broker's ACLs (kafka-acls.sh)",
                                                        "grant this principal DESCRIBE on the topics"))
    group = f"group {k.group_id}"
    try:
        future = admin.describe_consumer_groups([k.group_id], request_timeout=timeout_s,
                                                include_authorized_operations=True)[k.group_id]
        ops = future.result(timeout=timeout_s).authorized_operations
        allowed[group] = set(ops) if ops is not None else None
        needed.append((group, AclOperation.READ))
    except KafkaException as exc:
        err = exc.args[0]
        if err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
            allowed[group] = set()
            needed.append((group, AclOperation.READ))
        else:  # e.g. a group that has never existed on a new cluster: nothing to ask about yet
            notes.append(f"{group} not checkable ({err.name()})")
    missing = [f"{op.name} on {what}" for what, op in needed
               if allowed.get(what) is not None and not ({op, AclOperation.ALL} & allowed[what])]  # type: ignore[operator]
    if missing:
        return CheckResult.failed("kafka ACLs", Problem(f"this principal may not {', '.join(missing)}",
                                                        "the broker's ACLs (kafka-acls.sh)",
                                                        "grant them (kafka-acls.sh --add --allow-principal ...)"))
    checked = [f"{op.name} on {what}" for what, op in needed if allowed.get(what) is not None]
    if not checked:
        notes.insert(0, "not checkable: the broker reports no authorized operations")
    return CheckResult.passed("kafka ACLs", "; ".join((["allowed: " + ", ".join(checked)] if checked else []) + notes))


# --- database ---------------------------------------------------------------------------------------------------

def _database_checks(d: DatabaseSettings) -> Iterator[CheckResult]:
    url = d.url.get_secret_value()
    engine = db.create_engine(url)
    try:
        try:
            conn = engine.connect()
        except DBAPIError as exc:
            yield CheckResult.failed("database", describe_database_error(exc, url, from_file=d.url_file is not None))
            return
        with conn:
            version = ".".join(str(v) for v in conn.dialect.server_version_info or ())
            yield CheckResult.passed("database", f"{redacted_url(url)} reachable ({conn.dialect.name} {version})")
            migrated = yield from _schema_check(conn, d)
            yield _privileges_check(conn, d, migrated=migrated)
    finally:
        engine.dispose()


def _schema_check(conn: Connection, d: DatabaseSettings) -> Generator[CheckResult, None, bool]:
    """Yields the schema line; returns whether the tables are there (at head)."""
    scripts = AlembicConfig()
    scripts.set_main_option("script_location", str(resources.files("spectranet.streamer.runtime") / "migrations"))
    heads = set(ScriptDirectory.from_config(scripts).get_heads())
    current = set(MigrationContext.configure(conn).get_current_heads())
    conn.rollback()  # end the implicit transaction before the privilege queries
    if current == heads:
        yield CheckResult.passed("database schema", f"at head {', '.join(sorted(heads))}")
        return True
    at = ", ".join(sorted(current)) or "empty"
    if d.migrate_on_start:
        yield CheckResult.passed("database schema", f"at {at}, head is {', '.join(sorted(heads))}: the daemon "
                                                    "upgrades it on start (database.migrate_on_start)")
    else:
        yield CheckResult.failed("database schema", Problem(
            f"at {at}, head is {', '.join(sorted(heads))}", setting_names("database.migrate_on_start"),
            "run `spectranet db upgrade` as the owner (or let the daemon migrate on start)"))
    return False


def _privileges_check(conn: Connection, d: DatabaseSettings, *, migrated: bool) -> CheckResult:
    if conn.dialect.name == "sqlite":
        path = conn.engine.url.database
        if not path or path == ":memory:":
            return CheckResult.passed("database privileges", "SQLite in memory")
        target = Path(path) if Path(path).exists() else Path(path).parent
        if os.access(target, os.W_OK):
            return CheckResult.passed("database privileges", f"SQLite file {path} writable")
        return CheckResult.failed("database privileges", Problem(f"SQLite file {path} is not writable",
                                                                 setting_names("database.url"),
                                                                 "fix its permissions or set another file"))
    if conn.dialect.name != "postgresql":
        return CheckResult.passed("database privileges", f"not checkable on {conn.dialect.name}")
    user = conn.execute(sa.text("SELECT current_user")).scalar_one()
    missing = []
    if d.migrate_on_start and not conn.execute(
            sa.text("SELECT has_schema_privilege(current_schema(), 'CREATE')")).scalar_one():
        missing.append("CREATE on its schema (needed by database.migrate_on_start)")
    if migrated:
        wanted = [(t, p) for t in db.DAEMON_TABLES for p in ("SELECT", "INSERT")]
        wanted += [(v, "SELECT") for v in db.READ_ONLY]
        for name, privilege in wanted:
            if not conn.execute(sa.text("SELECT has_table_privilege(:name, :privilege)"),
                                {"name": name, "privilege": privilege}).scalar_one():
                missing.append(f"{privilege} on {name}")
    if missing:
        return CheckResult.failed("database privileges", Problem(
            f"role {user!r} lacks {', '.join(missing)}", setting_names("database.url"),
            f"run `spectranet db grant --role {user}` as the owner, or set database.migrate_on_start = false"))
    may = (["CREATE on its schema"] if d.migrate_on_start else []) + (
        ["SELECT, INSERT on its tables", "SELECT on the views"] if migrated else [])
    if not may:
        return CheckResult.passed("database privileges", "not checked: the tables are not there yet")
    return CheckResult.passed("database privileges", f"role {user!r} may {', '.join(may)}")


# --- model ------------------------------------------------------------------------------------------------------

def _model_check(m: ModelSettings) -> CheckResult:
    try:
        path = m.path if m.path is not None else default_checkpoint_path()
        checkpoint = load_checkpoint(path)  # verifies the weights' SHA-256 against the card
        checkpoint.build_model()            # and that they fit the config
    except CheckpointError as exc:
        return CheckResult.failed("model", Problem(str(exc), setting_names("model.path"),
                                                   "point it at a checkpoint (.safetensors next to its .json card), "
                                                   "or unset it for the shipped model"))
    return CheckResult.passed("model", f"{checkpoint.name} {checkpoint.version} from {path}: weights SHA-256 "
                                       f"{checkpoint.weights_sha256[:12]}... verified")


def _template_bank_check(m: ModelSettings) -> CheckResult:
    setting = m.templates.strip()
    if setting.lower() == TEMPLATES_OFF:
        return CheckResult.passed("template bank", "off (model.templates = none): redshifts are the network's")
    fix = ("point it at a template bank (.npz) built for this model's grid, unset it for the shipped one, or set "
           "'none' to turn refinement off")
    try:
        path = default_template_bank_path() if setting == TEMPLATES_DEFAULT else Path(setting)
        bank = load_template_bank(path)
        check_bank_fits(bank, load_checkpoint(m.path if m.path is not None else default_checkpoint_path()))
    except (CheckpointError, ConfigError) as exc:
        return CheckResult.failed("template bank", Problem(str(exc), setting_names("model.templates"), fix))
    return CheckResult.passed("template bank", f"{len(bank.objects)} template epochs from {path}, fit the model's grid")
