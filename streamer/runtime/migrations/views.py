"""The views of migration 0002, and the way a migration changes ``classifications`` columns under them.

The views select ``c.*``, which PostgreSQL expands when a view is created, so a migration that adds or drops a column
of ``classifications`` drops the views, changes the table, and creates them again with the same SQL
(``around_views``); the privileges granted on them (``spectranet db grant``) are read before and granted again after,
so that a daemon role keeps reading them. The SQL here is the views as 0002 created them: a migration that changes a
view's SQL keeps its own copy of the new one, so that every revision stays the snapshot it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

__all__ = ["VIEWS_0002", "around_views", "add_classification_columns", "drop_classification_columns"]

# Window functions work on PostgreSQL and SQLite >= 3.25 alike.
LATEST_PER_SPECTRUM = """
CREATE VIEW latest_classification_per_spectrum AS
SELECT * FROM (
  SELECT c.*, ROW_NUMBER() OVER (
    PARTITION BY c.spectrum_id ORDER BY c.revision DESC, c.processed_at DESC, c.model_version DESC) AS rank
  FROM classifications c) ranked
WHERE rank = 1
"""

LATEST_PER_OBJECT = """
CREATE VIEW latest_classification_per_object AS
SELECT * FROM (
  SELECT c.*, s.obs_mjd, ROW_NUMBER() OVER (
    PARTITION BY c.object_id ORDER BY s.obs_mjd DESC, c.revision DESC, c.processed_at DESC) AS rank
  FROM classifications c
  JOIN spectra s ON s.spectrum_id = c.spectrum_id AND s.revision = c.revision) ranked
WHERE rank = 1
"""

CLASS_CHANGES = """
CREATE VIEW class_changes_between_models AS
SELECT a.object_id, a.spectrum_id, a.revision,
       a.model_name AS model_a, a.model_version AS version_a, a.top_class AS class_a,
       b.model_name AS model_b, b.model_version AS version_b, b.top_class AS class_b
FROM classifications a
JOIN classifications b
  ON a.spectrum_id = b.spectrum_id AND a.revision = b.revision
 AND (a.model_name < b.model_name OR (a.model_name = b.model_name AND a.model_version < b.model_version))
WHERE a.top_class <> b.top_class
"""

VIEWS_0002: Mapping[str, str] = {
    "latest_classification_per_spectrum": LATEST_PER_SPECTRUM,
    "latest_classification_per_object": LATEST_PER_OBJECT,
    "class_changes_between_models": CLASS_CHANGES,
}
"""Name -> CREATE VIEW statement, in creation order."""


def _grants(views: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(view, grantee, privilege) granted on the views to roles other than the one migrating (PostgreSQL only)."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return []
    rows = bind.execute(sa.text(
        "SELECT table_name, grantee, privilege_type FROM information_schema.role_table_grants "
        "WHERE table_schema = current_schema() AND table_name = ANY(:views) AND grantee <> current_user"),
        {"views": list(views)})
    return [(r[0], r[1], r[2]) for r in rows]


def _grant_again(grants: list[tuple[str, str, str]]) -> None:
    preparer = op.get_bind().dialect.identifier_preparer
    for view, grantee, privilege in grants:
        who = "PUBLIC" if grantee == "PUBLIC" else preparer.quote_identifier(grantee)
        op.execute(f"GRANT {privilege} ON {preparer.quote_identifier(view)} TO {who}")


def around_views(change: Callable[[], None], views: Mapping[str, str] = VIEWS_0002) -> None:
    """Drop ``views``, run ``change`` (an ``op`` on the tables), create them again and grant again what was granted."""
    grants = _grants(views)
    for view in reversed(list(views)):
        op.execute(f"DROP VIEW {view}")
    change()
    for sql in views.values():
        op.execute(sql)
    _grant_again(grants)


def add_classification_columns(columns: Sequence[tuple[str, Any]]) -> None:
    """Add nullable (name, type) ``columns`` to ``classifications`` under the views (rows written before: null)."""
    def add() -> None:
        for name, type_ in columns:
            op.add_column("classifications", sa.Column(name, type_, nullable=True))

    around_views(add)


def drop_classification_columns(columns: Sequence[tuple[str, Any]]) -> None:
    """Drop ``columns`` from ``classifications`` under the views, last first (batch mode: SQLite too)."""
    def drop() -> None:
        with op.batch_alter_table("classifications") as batch:
            for name, _ in reversed(columns):
                batch.drop_column(name)

    around_views(drop)
