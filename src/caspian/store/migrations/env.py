"""Alembic environment, run only by ``Store.upgrade``.

There is no ``alembic.ini``: the store builds the Alembic config in code and hands over
the connection it has opened (``config.attributes["connection"]``), so migrations run in
the store's own transaction, over either back end.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from caspian.store.models import Base


def _run() -> None:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError("the store's migrations run through caspian.store.Store.upgrade")
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()


_run()
