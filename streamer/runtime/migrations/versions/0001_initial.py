"""Initial schema: models registry, spectra, classifications, dead letters.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("taxonomy", JSONType, nullable=False),
        sa.Column("model_metadata", JSONType, nullable=False),
        sa.Column("registered_at", TS, server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "spectra",
        sa.Column("spectrum_id", sa.String(256), primary_key=True),
        sa.Column("revision", sa.Integer, primary_key=True),
        sa.Column("object_id", sa.String(256), nullable=False),
        sa.Column("survey", sa.String(64), nullable=False),
        sa.Column("tns_name", sa.String(64)),
        sa.Column("instrument", sa.String(128), nullable=False),
        sa.Column("ra", sa.Float),
        sa.Column("dec", sa.Float),
        sa.Column("obs_mjd", sa.Float, nullable=False),
        sa.Column("n_pixels", sa.Integer, nullable=False),
        sa.Column("produced_at", TS, nullable=False),
        sa.Column("received_at", TS, nullable=False),
    )
    op.create_index("ix_spectra_object_id", "spectra", ["object_id"])
    op.create_table(
        "classifications",
        sa.Column("spectrum_id", sa.String(256), primary_key=True),
        sa.Column("revision", sa.Integer, primary_key=True),
        sa.Column("model_name", sa.String(128), primary_key=True),
        sa.Column("model_version", sa.String(64), primary_key=True),
        sa.Column("annotation_id", sa.String(36), nullable=False, unique=True),
        sa.Column("object_id", sa.String(256), nullable=False),
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
        sa.Column("processed_at", TS, nullable=False),
        sa.Column("source_topic", sa.String(256), nullable=False),
        sa.Column("source_partition", sa.Integer, nullable=False),
        sa.Column("source_offset", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_classifications_object_id", "classifications", ["object_id"])
    op.create_table(
        "dead_letters",
        sa.Column("source_topic", sa.String(256), primary_key=True),
        sa.Column("source_partition", sa.Integer, primary_key=True),
        sa.Column("source_offset", sa.BigInteger, primary_key=True),
        sa.Column("spectrum_id", sa.String(256)),
        sa.Column("error_class", sa.String(64), nullable=False),
        sa.Column("error_field", sa.String(64)),
        sa.Column("error_message", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary),
        sa.Column("failed_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_index("ix_classifications_object_id", "classifications")
    op.drop_table("classifications")
    op.drop_index("ix_spectra_object_id", "spectra")
    op.drop_table("spectra")
    op.drop_table("models")
