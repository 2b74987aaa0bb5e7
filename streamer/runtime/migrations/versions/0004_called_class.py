"""Schema 1.2's ``called_class`` in ``classifications``: the class called down the taxonomy's tree (nullable: rows
written before stay as they were).

As in 0003, the views select ``c.*``, which PostgreSQL expands when a view is created, so they are dropped and created
again around the column change (the same SQL), in both directions, with the privileges granted on them granted again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""
from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = (
    ("called_class", sa.String(32)),
)

# The views as 0002 created them and 0003 recreated them (a migration is a snapshot: it imports no other one).
VIEWS = {
    "latest_classification_per_spectrum": """
CREATE VIEW latest_classification_per_spectrum AS
SELECT * FROM (
  SELECT c.*, ROW_NUMBER() OVER (
    PARTITION BY c.spectrum_id ORDER BY c.revision DESC, c.processed_at DESC, c.model_version DESC) AS rank
  FROM classifications c) ranked
WHERE rank = 1
""",
    "latest_classification_per_object": """
CREATE VIEW latest_classification_per_object AS
SELECT * FROM (
  SELECT c.*, s.obs_mjd, ROW_NUMBER() OVER (
    PARTITION BY c.object_id ORDER BY s.obs_mjd DESC, c.revision DESC, c.processed_at DESC) AS rank
  FROM classifications c
  JOIN spectra s ON s.spectrum_id = c.spectrum_id AND s.revision = c.revision) ranked
WHERE rank = 1
""",
    "class_changes_between_models": """
CREATE VIEW class_changes_between_models AS
SELECT a.object_id, a.spectrum_id, a.revision,
       a.model_name AS model_a, a.model_version AS version_a, a.top_class AS class_a,
       b.model_name AS model_b, b.model_version AS version_b, b.top_class AS class_b
FROM classifications a
JOIN classifications b
  ON a.spectrum_id = b.spectrum_id AND a.revision = b.revision
 AND (a.model_name < b.model_name OR (a.model_name = b.model_name AND a.model_version < b.model_version))
WHERE a.top_class <> b.top_class
""",
}


def _grants() -> list[tuple[str, str, str]]:
    """(view, grantee, privilege) granted on the views to roles other than the one migrating (PostgreSQL only)."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return []
    rows = bind.execute(sa.text(
        "SELECT table_name, grantee, privilege_type FROM information_schema.role_table_grants "
        "WHERE table_schema = current_schema() AND table_name = ANY(:views) AND grantee <> current_user"),
        {"views": list(VIEWS)})
    return [(r[0], r[1], r[2]) for r in rows]


def _grant_again(grants: list[tuple[str, str, str]]) -> None:
    preparer = op.get_bind().dialect.identifier_preparer
    for view, grantee, privilege in grants:
        who = "PUBLIC" if grantee == "PUBLIC" else preparer.quote_identifier(grantee)
        op.execute(f"GRANT {privilege} ON {preparer.quote_identifier(view)} TO {who}")


def _around_views(change: Callable[[], None]) -> None:
    grants = _grants()
    for view in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW {view}")
    change()
    for sql in VIEWS.values():
        op.execute(sql)
    _grant_again(grants)


def upgrade() -> None:
    def add() -> None:
        for name, type_ in COLUMNS:
            op.add_column("classifications", sa.Column(name, type_, nullable=True))

    _around_views(add)


def downgrade() -> None:
    def drop() -> None:
        with op.batch_alter_table("classifications") as batch:
            for name, _ in reversed(COLUMNS):
                batch.drop_column(name)

    _around_views(drop)
