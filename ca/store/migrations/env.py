"""Alembic environment: always run with a connection handed in by ``ca.store.engine.Store``."""

from alembic import context

from ca.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `chargepki db upgrade` (ca.store.engine.Store.upgrade)")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
