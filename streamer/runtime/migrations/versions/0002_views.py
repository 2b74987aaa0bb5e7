"""Views that answer users' questions directly, their indexes, and optional raw packets.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""
import sqlalchemy as sa
from alembic import op
from spectranet.streamer.runtime.migrations.views import VIEWS_0002

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("spectra", sa.Column("raw_packet", sa.LargeBinary, nullable=True))
    op.create_index("ix_classifications_spectrum_latest", "classifications",
                    ["spectrum_id", "revision", "processed_at"])
    op.create_index("ix_classifications_model", "classifications", ["model_name", "model_version"])
    op.create_index("ix_classifications_processed_at", "classifications", ["processed_at"])
    op.create_index("ix_spectra_object_mjd", "spectra", ["object_id", "obs_mjd"])
    op.create_index("ix_dead_letters_failed_at", "dead_letters", ["failed_at"])
    for sql in VIEWS_0002.values():  # their SQL: migrations/views.py
        op.execute(sql)


def downgrade() -> None:
    for view in reversed(list(VIEWS_0002)):
        op.execute(f"DROP VIEW {view}")
    op.drop_index("ix_dead_letters_failed_at", "dead_letters")
    op.drop_index("ix_spectra_object_mjd", "spectra")
    op.drop_index("ix_classifications_processed_at", "classifications")
    op.drop_index("ix_classifications_model", "classifications")
    op.drop_index("ix_classifications_spectrum_latest", "classifications")
    with op.batch_alter_table("spectra") as batch:
        batch.drop_column("raw_packet")
