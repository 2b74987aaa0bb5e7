"""Result storage: SQLAlchemy Core tables, idempotent writes, and Alembic upgrades.

Every write is an ``INSERT ... ON CONFLICT DO NOTHING`` keyed by what makes a result unique (spectrum id, revision
and model for classifications; topic, partition and offset for dead letters), so replaying a batch after a crash
leaves the database as if it had been written once. One batch is one transaction.

The columns that hold packet strings are as long as the contract allows (``contract.packets.STRING_LIMITS``), so a
validated packet always fits; the template columns are as long as ``contract.annotate.TEMPLATE_STRING_LIMITS``, which
the daemon checks its template bank against at start-up. ``is_row_error`` tells a row the database refuses (its data)
from a database that does not answer (infrastructure); ``storable`` makes any text fit a column, for dead letters that
must be stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from spectranet.streamer.contract.annotate import OUT_OF_DISTRIBUTION, TEMPLATE_STRING_LIMITS
from spectranet.streamer.contract.packets import STRING_LIMITS
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

__all__ = ["metadata", "models", "spectra", "classifications", "dead_letters", "ClassificationRow",
           "DeadLetterRow", "create_engine", "upgrade", "downgrade", "write_batch", "register_model",
           "least_privilege_grants", "grant_least_privilege", "is_row_error", "storable", "unstorable_column"]

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
metadata = sa.MetaData()


def _packet_string(field: str) -> sa.String:
    """A column for a packet's string field, as long as the contract allows (the 0001 migration spells the same)."""
    return sa.String(STRING_LIMITS[field])


models = sa.Table(
    "models", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("weights_sha256", sa.String(64), nullable=False),
    sa.Column("taxonomy", JSONType, nullable=False),
    sa.Column("model_metadata", JSONType, nullable=False),
    sa.Column("registered_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
)

spectra = sa.Table(
    "spectra", metadata,
    sa.Column("spectrum_id", _packet_string("spectrum_id"), primary_key=True),
    sa.Column("revision", sa.Integer, primary_key=True),
    sa.Column("object_id", _packet_string("object_id"), nullable=False, index=True),
    sa.Column("survey", _packet_string("survey"), nullable=False),
    sa.Column("tns_name", _packet_string("tns_name")),
    sa.Column("instrument", _packet_string("instrument"), nullable=False),
    sa.Column("ra", sa.Float),
    sa.Column("dec", sa.Float),
    sa.Column("obs_mjd", sa.Float, nullable=False),
    sa.Column("n_pixels", sa.Integer, nullable=False),
    sa.Column("produced_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("raw_packet", sa.LargeBinary),  # the packet as received, when database.store_arrays is set
)

classifications = sa.Table(
    "classifications", metadata,
    sa.Column("spectrum_id", _packet_string("spectrum_id"), primary_key=True),
    sa.Column("revision", sa.Integer, primary_key=True),
    sa.Column("model_name", sa.String(128), primary_key=True),
    sa.Column("model_version", sa.String(64), primary_key=True),
    sa.Column("annotation_id", sa.String(36), nullable=False, unique=True),
    sa.Column("object_id", _packet_string("object_id"), nullable=False, index=True),
    sa.Column("probabilities", JSONType, nullable=False),
    sa.Column("top_class", sa.String(32), nullable=False),
    sa.Column("top_probability", sa.Float, nullable=False),
    sa.Column("z", sa.Float, nullable=False),
    sa.Column("z_err", sa.Float),
    sa.Column("z_method", sa.String(16), nullable=False),
    sa.Column("coverage_fraction", sa.Float, nullable=False),
    sa.Column("median_snr", sa.Float),
    sa.Column("ood_score", sa.Float),
    sa.Column("flags", JSONType, nullable=False),
    sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("source_topic", sa.String(256), nullable=False),
    sa.Column("source_partition", sa.Integer, nullable=False),
    sa.Column("source_offset", sa.BigInteger, nullable=False),
    # Since migration 0003 (schema 1.1); null in rows written before it.
    sa.Column("z_network", sa.Float),                                   # the network's own redshift
    sa.Column("template_object", sa.String(TEMPLATE_STRING_LIMITS["object"])),  # best-matching template, when
    sa.Column("template_type", sa.String(TEMPLATE_STRING_LIMITS["type"])),      # z_method is 'template'
    sa.Column("template_phase", sa.Float),                              # days from maximum light
    sa.Column("template_r", sa.Float),                                  # SNID r-value of the match
    sa.Column("confident", sa.Boolean),                                 # null: the model has no thresholds
    sa.Column("out_of_distribution", sa.Boolean),
    # Since migration 0004 (schema 1.2); null in rows written before it.
    sa.Column("called_class", sa.String(32)),                           # the class called down the taxonomy's tree
)

dead_letters = sa.Table(
    "dead_letters", metadata,
    sa.Column("source_topic", sa.String(256), primary_key=True),
    sa.Column("source_partition", sa.Integer, primary_key=True),
    sa.Column("source_offset", sa.BigInteger, primary_key=True),
    sa.Column("spectrum_id", _packet_string("spectrum_id")),  # sanitised and cut to fit (``storable``)
    sa.Column("error_class", sa.String(64), nullable=False),
    sa.Column("error_field", sa.String(64)),
    sa.Column("error_message", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary),
    sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class ClassificationRow:
    """One spectrum's packet metadata plus its classification by one model."""

    spectrum: dict[str, Any]        # columns of ``spectra``
    classification: dict[str, Any]  # columns of ``classifications``


@dataclass(frozen=True)
class DeadLetterRow:
    values: dict[str, Any]          # columns of ``dead_letters``


def create_engine(url: str) -> Engine:
    """An engine with the pool settings a long-running daemon wants (stale connections are detected, not crashed on)."""
    return sa.create_engine(url, pool_pre_ping=True, future=True)


def _alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("spectranet.streamer.runtime") / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with Alembic (``spectranet db upgrade``); tables are never created by hand."""
    command.upgrade(_alembic_config(url), revision)


DAEMON_TABLES = ("models", "spectra", "classifications", "dead_letters")
READ_ONLY = ("alembic_version", "latest_classification_per_spectrum", "latest_classification_per_object",
             "class_changes_between_models")


def least_privilege_grants(role: str) -> list[str]:
    """GRANTs that let ``role`` run the daemon and nothing else: read and insert its tables, read the views.

    Inserts use ``ON CONFLICT DO NOTHING``, which needs no UPDATE privilege; migrations run as the owner
    (``spectranet db upgrade``) and the daemon runs with ``database.migrate_on_start = false``.
    """
    if not role.replace("_", "").isalnum():
        raise ValueError(f"role name {role!r} must be alphanumeric with underscores")  # it is spliced into DDL
    return [
        f"GRANT USAGE ON SCHEMA public TO {role}",
        f"GRANT SELECT, INSERT ON {', '.join(DAEMON_TABLES)} TO {role}",
        f"GRANT SELECT ON {', '.join(READ_ONLY)} TO {role}",
    ]


def grant_least_privilege(engine: Engine, role: str) -> None:
    with engine.begin() as conn:
        for statement in least_privilege_grants(role):
            conn.execute(sa.text(statement))


def downgrade(url: str, revision: str) -> None:
    """Step the schema back to ``revision`` (``base`` drops everything): an owner's operation."""
    command.downgrade(_alembic_config(url), revision)


def _insert(engine_or_conn: sa.Connection, table: sa.Table) -> Any:
    dialect = engine_or_conn.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"idempotent inserts are implemented for PostgreSQL and SQLite, not {dialect}")


def register_model(engine: Engine, *, name: str, version: str, weights_sha256: str,
                   taxonomy: Sequence[str], model_metadata: dict[str, Any]) -> None:
    """Record the model in the registry (once; the same name+version with other weights is an error)."""
    with engine.begin() as conn:
        conn.execute(_insert(conn, models).values(
            name=name, version=version, weights_sha256=weights_sha256,
            taxonomy=list(taxonomy), model_metadata=model_metadata,
        ).on_conflict_do_nothing())
        stored = conn.execute(sa.select(models.c.weights_sha256).where(
            models.c.name == name, models.c.version == version)).scalar_one()
    if stored != weights_sha256:
        raise ValueError(f"model {name} {version} is registered with weights {stored[:12]}..., "
                         f"not {weights_sha256[:12]}...; bump the model version")


def write_batch(engine: Engine, rows: Sequence[ClassificationRow], dead: Sequence[DeadLetterRow] = ()) -> None:
    """Write a batch's results and dead letters in one transaction; replays are no-ops."""
    with engine.begin() as conn:
        if rows:
            conn.execute(_insert(conn, spectra).on_conflict_do_nothing(), [r.spectrum for r in rows])
            conn.execute(_insert(conn, classifications).on_conflict_do_nothing(), [r.classification for r in rows])
        if dead:
            conn.execute(_insert(conn, dead_letters).on_conflict_do_nothing(), [d.values for d in dead])


def classification_rows(packet: Mapping[str, Any], annotation: Mapping[str, Any]) -> ClassificationRow:
    """The ``spectra`` and ``classifications`` rows for one annotated packet."""
    q, z, src = annotation["quality"], annotation["redshift"], annotation["source"]
    template = z.get("template") or {}
    return ClassificationRow(
        spectrum={
            "spectrum_id": packet["spectrum_id"], "revision": packet["revision"], "object_id": packet["object_id"],
            "survey": packet["survey"], "tns_name": packet.get("tns_name"), "instrument": packet["instrument"],
            "ra": packet.get("ra"), "dec": packet.get("dec"), "obs_mjd": packet["obs_mjd"],
            "n_pixels": len(packet["wavelength"]), "produced_at": annotation["timing"]["produced_at"],
            "received_at": annotation["timing"]["consumed_at"],
        },
        classification={
            "spectrum_id": packet["spectrum_id"], "revision": packet["revision"],
            "model_name": annotation["classifier"]["name"], "model_version": annotation["classifier"]["version"],
            "annotation_id": annotation["annotation_id"], "object_id": packet["object_id"],
            "probabilities": {c["class_name"]: c["probability"] for c in annotation["classifications"]},
            "top_class": annotation["top_class"], "top_probability": annotation["top_probability"],
            "z": z["z"], "z_err": z["z_err"], "z_method": z["method"],
            "coverage_fraction": q["coverage_fraction"], "median_snr": q["median_snr"], "ood_score": q["ood_score"],
            "flags": q["flags"], "processed_at": annotation["timing"]["classified_at"],
            "source_topic": src["topic"], "source_partition": src["partition"], "source_offset": src["offset"],
            "z_network": z.get("z_network"), "template_object": template.get("object"),
            "template_type": template.get("type"), "template_phase": template.get("phase"),
            "template_r": template.get("r"), "confident": annotation.get("confident"),
            "out_of_distribution": OUT_OF_DISTRIBUTION in q["flags"],
            "called_class": annotation.get("called_class"),
        },
    )


# SQLSTATE classes of errors caused by the values of a row: 22 data exception (value too long, invalid text, NUL,
# untranslatable character, out of range), 23 integrity constraint violation. Everything else (08 connection, 53
# insufficient resources, 57 operator intervention, 40 rollback, 42 undefined table, ...) is the database's.
_ROW_SQLSTATE_CLASSES = ("22", "23")


def is_row_error(exc: BaseException) -> bool:
    """True when the database (or its driver) refused a statement because of the values of a row; False for every
    other failure (connection lost, server down, missing table, ...), which is retried rather than blamed on data."""
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return False
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate:
            return str(sqlstate)[:2] in _ROW_SQLSTATE_CLASSES
        # Refused by the driver before it reached the server (psycopg: "text fields cannot contain NUL"), or SQLite.
        return isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError))
    if isinstance(exc, sa.exc.StatementError):  # a bind parameter SQLAlchemy could not convert
        return isinstance(exc.orig, (ValueError, TypeError))
    # The driver encoding a parameter (UnicodeEncodeError for a lone surrogate) raises outside SQLAlchemy's wrapping.
    return isinstance(exc, (UnicodeError, OverflowError))


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
MAX_TEXT_CHARS = 10_000  # error messages in dead_letters (a Text column): enough for any reason, bounded


def storable(column: sa.Column[Any], text: str | None) -> tuple[str | None, str | None]:
    """``text`` as ``column`` can hold it, and what was changed (None when nothing was): NULs and lone surrogates
    become U+FFFD, and the value is cut to the column's length (``MAX_TEXT_CHARS`` for unbounded text)."""
    if text is None:
        return None, None
    changes = []
    clean, n = _UNSTORABLE.subn("\ufffd", text)
    if n:
        changes.append(f"{n} NUL or surrogate characters replaced")
    limit = getattr(column.type, "length", None) or MAX_TEXT_CHARS
    if len(clean) > limit:
        changes.append(f"cut from {len(clean)} to {limit} characters")
        clean = clean[:limit]
    return clean, "; ".join(changes) or None


def unstorable_column(engine: Engine, table: sa.Table, values: Mapping[str, Any]) -> str | None:
    """The first string column of ``table`` whose value in ``values`` the live database cannot hold (a NUL, or
    longer than the column as it really is: a database altered by hand may be narrower than ``table`` says)."""
    try:
        live = {c["name"]: getattr(c["type"], "length", None) for c in sa.inspect(engine).get_columns(table.name)}
    except sa.exc.SQLAlchemyError:  # only to name the column; the row is dead-lettered either way
        live = {}
    for name, value in values.items():
        if not isinstance(value, str) or name not in table.c:
            continue
        length = live.get(name) or getattr(table.c[name].type, "length", None)
        if _UNSTORABLE.search(value) or (length is not None and len(value) > length):
            return name
    return None
