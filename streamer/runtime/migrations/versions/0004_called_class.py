"""Schema 1.2's ``called_class`` in ``classifications``: the class called down the taxonomy's tree (nullable: rows
written before stay as they were).

As in 0003, the views are dropped and created again around the column change, in both directions, with the privileges
granted on them granted again (``migrations.views.around_views``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from spectranet.streamer.runtime.migrations.views import add_classification_columns, drop_classification_columns

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = (
    ("called_class", sa.String(32)),
)


def upgrade() -> None:
    add_classification_columns(COLUMNS)


def downgrade() -> None:
    drop_classification_columns(COLUMNS)
