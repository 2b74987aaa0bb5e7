"""Schema 1.1's outputs in ``classifications``: the network's redshift beside the refined one, the best-matching
template, ``confident`` and ``out_of_distribution`` (all nullable: rows written before stay as they were).

The views of 0002 select ``c.*``, which PostgreSQL expands when a view is created, so they are dropped and created
again around the column change (the same SQL), in both directions; the privileges granted on them
(``spectranet db grant``) are read before and granted again after, so that a daemon role keeps reading them
(``migrations.views.around_views``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from spectranet.streamer.runtime.migrations.views import add_classification_columns, drop_classification_columns

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = (
    ("z_network", sa.Float),
    ("template_object", sa.String(64)),   # contract.annotate.TEMPLATE_STRING_LIMITS
    ("template_type", sa.String(32)),
    ("template_phase", sa.Float),
    ("template_r", sa.Float),
    ("confident", sa.Boolean),
    ("out_of_distribution", sa.Boolean),
)


def upgrade() -> None:
    add_classification_columns(COLUMNS)


def downgrade() -> None:
    drop_classification_columns(COLUMNS)
