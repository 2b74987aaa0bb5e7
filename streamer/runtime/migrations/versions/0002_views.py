"""Views that answer users' questions directly, their indexes, and optional raw packets.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

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


def upgrade() -> None:
    op.add_column("spectra", sa.Column("raw_packet", sa.LargeBinary, nullable=True))
    op.create_index("ix_classifications_spectrum_latest", "classifications",
                    ["spectrum_id", "revision", "processed_at"])
    op.create_index("ix_classifications_model", "classifications", ["model_name", "model_version"])
    op.create_index("ix_classifications_processed_at", "classifications", ["processed_at"])
    op.create_index("ix_spectra_object_mjd", "spectra", ["object_id", "obs_mjd"])
    op.create_index("ix_dead_letters_failed_at", "dead_letters", ["failed_at"])
    op.execute(LATEST_PER_SPECTRUM)
    op.execute(LATEST_PER_OBJECT)
    op.execute(CLASS_CHANGES)


def downgrade() -> None:
    for view in ("class_changes_between_models", "latest_classification_per_object",
                 "latest_classification_per_spectrum"):
        op.execute(f"DROP VIEW {view}")
    op.drop_index("ix_dead_letters_failed_at", "dead_letters")
    op.drop_index("ix_spectra_object_mjd", "spectra")
    op.drop_index("ix_classifications_processed_at", "classifications")
    op.drop_index("ix_classifications_model", "classifications")
    op.drop_index("ix_classifications_spectrum_latest", "classifications")
    with op.batch_alter_table("spectra") as batch:
        batch.drop_column("raw_packet")
