"""Alembic environment: runs migrations online against the URL set by ``spectranet.streamer.runtime.db.upgrade``."""

from alembic import context
from spectranet.streamer.runtime.db import metadata
from sqlalchemy import engine_from_config, pool

config = context.config
target_metadata = metadata

connectable = engine_from_config(config.get_section(config.config_ini_section, {}) or
                                 {"sqlalchemy.url": config.get_main_option("sqlalchemy.url")},
                                 prefix="sqlalchemy.", poolclass=pool.NullPool)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
