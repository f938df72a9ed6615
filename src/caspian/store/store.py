"""The service's database, on SQLite or PostgreSQL: users, their API keys, the reference data,
and the cluster's registry of open stream sessions.

Secrets and passwords are kept only as argon2id hashes. Any failure to reach or use the
database comes out of a ``Store`` method as ``StoreUnavailable``, and the store needs no
help to recover: PostgreSQL connections are pinged before use, so those the database
dropped are replaced once it is back. The store keeps ``POOL_SIZE`` connections, opened at
start by ``prepare``: its descriptors and threads stay fixed, however many requests come.
On a SQLite file, the reads behind every token check have one more connection, and a
thread, of their own (``Store._read``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import string
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import bindparam, create_engine, delete, event, exists, insert, select
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from caspian.auth import hashing
from caspian.catalog.product import ProductSpec
from caspian.files import PRIVATE_DIR, private_file, tighten_if_present
from caspian.store.models import (
    KEY_ID_LENGTH,
    USER_NAME_LENGTH,
    ApiKey,
    EndedToken,
    Entitlement,
    Exchange,
    Gateway,
    Product,
    StreamSession,
    User,
)
from caspian.timefmt import format_dt, now_us, us_to_dt

#: ``Store.principal`` kinds: who an access token was issued to.
KEY = "key"
USER = "user"

KEY_ID_ALPHABET = string.ascii_uppercase + string.digits
#: ``token_urlsafe(32)`` gives 43 characters.
_SECRET_BYTES = 32
_USER_NAME = re.compile(rf"[A-Za-z0-9._@-]{{1,{USER_NAME_LENGTH}}}")

# A request against a dead PostgreSQL must fail fast rather than hang; the command timeout
# also covers a server that vanished without closing its connections.
_PG_CONNECT_TIMEOUT = 5.0
_PG_COMMAND_TIMEOUT = 30.0
_SQLITE_BUSY_TIMEOUT_MS = 10_000
#: Database connections, no more: a burst of requests past these waits its turn (then
#: ``StoreUnavailable`` after ``_POOL_TIMEOUT_S``) rather than open more. Each SQLite
#: connection is a thread (aiosqlite's) and descriptors on the database and its
#: write-ahead log; with SQLAlchemy's default of 5 kept and 10 more under a burst, a
#: server's descriptor count followed its load, and a soak run could not tell that
#: from a leak. Requests hold a connection for a few short queries, never across an
#: argon2 check.
POOL_SIZE = 5
_POOL_TIMEOUT_S = 10.0

_T = TypeVar("_T")

#: Execution option marking a session that will write (SQLite takes its write lock up front).
_WRITE = "caspian_write"

_MIGRATIONS = Path(__file__).with_name("migrations")
_SPEC_FIELDS = tuple(field.name for field in fields(ProductSpec))
#: Ids per statement when deleting sessions: far below every back end's limit of bound
#: parameters, however many connections a gateway lost between two syncs.
_IDS_PER_STATEMENT = 1000


class StoreError(Exception):
    """Base of the store's errors."""


class AlreadyExists(StoreError):
    pass


class NotFound(StoreError):
    pass


class StoreUnavailable(StoreError):
    """The database could not be reached or used; the same call may succeed later."""


@dataclass(frozen=True, slots=True)
class UserInfo:
    name: str
    has_password: bool
    all_exchanges: bool
    #: The exchanges granted one by one; empty while ``all_exchanges`` is true.
    exchanges: tuple[str, ...]
    created_time: datetime
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    user: str
    created_time: datetime
    revoked: bool


@dataclass(frozen=True, slots=True)
class Principal:
    """Whom a token speaks for, and the exchanges they may see (None: every exchange)."""

    user: str
    exchanges: frozenset[str] | None
    #: The user is disabled: no token of theirs works.
    disabled: bool = False
    #: The user's tokens issued before this no longer work; None: all of them do.
    tokens_not_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    """A running gateway process, as the session registry knows it."""

    id: str
    host: str
    pid: int
    started_time: datetime


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """An open stream session, as the session registry knows it."""

    id: str
    user: str
    #: The key whose token opened the session; None for a Credential login's token.
    key_id: str | None
    #: The client's address, ``ip:port``.
    peer: str
    opened_time: datetime


@dataclass(frozen=True, slots=True)
class GatewaySync:
    """The store's answer to a gateway's ``sync_gateway``."""

    #: The gateway's row was missing: purged as stale by another instance, and with it
    #: every session the gateway had registered.
    rejoined: bool
    #: The gateway's sessions the registry holds now.
    sessions: frozenset[str]


@dataclass(frozen=True, slots=True)
class RegisteredSession:
    session: SessionInfo
    gateway: GatewayInfo


@dataclass(frozen=True, slots=True)
class ProductRecord:
    spec: ProductSpec
    created_time: datetime
    updated_time: datetime

    def api_dict(self) -> dict[str, Any]:
        return {
            **self.spec.api_fields(),
            "createdTime": format_dt(self.created_time),
            "updatedTime": format_dt(self.updated_time),
        }


def _now() -> datetime:
    return us_to_dt(now_us())


def _check_user_name(name: str) -> None:
    if not _USER_NAME.fullmatch(name):
        raise ValueError(
            f"invalid user name {name!r}: 1 to {USER_NAME_LENGTH} letters, digits or ._-@"
        )


def _means_unavailable(exc: Exception) -> bool:
    if isinstance(exc, DBAPIError):
        # Constraint violations and bad statements are answers from a working database.
        return exc.connection_invalidated or not isinstance(
            exc, IntegrityError | ProgrammingError | DataError
        )
    return isinstance(exc, PoolTimeoutError | OSError)


@asynccontextmanager
async def _availability() -> AsyncIterator[None]:
    try:
        yield
    except (DBAPIError, PoolTimeoutError, OSError) as exc:
        if not _means_unavailable(exc):
            raise
        raise StoreUnavailable(f"could not access the database ({type(exc).__name__})") from exc


def _pooled(url: URL) -> bool:
    """Whether the engine for ``url`` keeps a pool of connections: every database but an
    in-memory SQLite one, which lives in its one connection."""
    if url.get_backend_name() != "sqlite":
        return True
    return url.database not in (None, "", ":memory:") and url.query.get("mode") != "memory"


def _private_sqlite(path: Path) -> None:
    """The database file made, or tightened, before SQLite opens it: SQLite gives its
    write-ahead log and shared-memory files the database file's permissions."""
    path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        tighten_if_present(path.with_name(path.name + suffix))


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Turn off the driver's implicit BEGIN so that _on_sqlite_begin decides how each
    # transaction starts.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets the CLI write while a server reads the same file; the busy timeout makes a
    # writer wait for the other process's lock instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _on_sqlite_begin(connection: Connection) -> None:
    # A transaction that reads and then writes fails at once, busy timeout or not, if
    # another process wrote in between; taking the write lock first makes it wait instead.
    immediate = connection.get_execution_options().get(_WRITE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _hook_sqlite(engine: Engine) -> None:
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)


def _read_on(engine: Engine, read: Callable[[Connection], _T]) -> _T:
    with engine.connect() as connection:
        return read(connection)


def _migrate(connection: Connection) -> bool:
    """Upgrade to the latest migration; whether the store had no schema before (new)."""
    new = MigrationContext.configure(connection).get_current_revision() is None
    config = Config()
    # Config values go through ConfigParser interpolation, where "%" is special.
    config.set_main_option("script_location", str(_MIGRATIONS).replace("%", "%%"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    return new


def _user_info(user: User, exchanges: Iterable[str]) -> UserInfo:
    return UserInfo(
        name=user.name,
        has_password=user.password_hash is not None,
        all_exchanges=user.all_exchanges,
        exchanges=() if user.all_exchanges else tuple(sorted(exchanges)),
        created_time=user.created_time,
        disabled=user.disabled,
    )


def _product_record(row: Product) -> ProductRecord:
    spec = ProductSpec(**{name: getattr(row, name) for name in _SPEC_FIELDS})
    return ProductRecord(spec=spec, created_time=row.created_time, updated_time=row.updated_time)


def _gateway_info(row: Gateway) -> GatewayInfo:
    return GatewayInfo(id=row.id, host=row.host, pid=row.pid, started_time=row.started_time)


def _session_info(row: StreamSession) -> SessionInfo:
    return SessionInfo(
        id=row.id, user=row.user_name, key_id=row.key_id, peer=row.peer, opened_time=row.opened_time
    )


async def _find_user(session: AsyncSession, name: str) -> User | None:
    user: User | None = await session.scalar(select(User).where(User.name == name))
    return user


async def _require_user(session: AsyncSession, name: str) -> User:
    user = await _find_user(session, name)
    if user is None:
        raise NotFound(f"no user {name!r}")
    return user


async def _entitled(session: AsyncSession, user_id: int) -> list[str]:
    codes = await session.scalars(
        select(Entitlement.exchange_code).where(Entitlement.user_id == user_id)
    )
    return list(codes)


# Built once: a statement made per call cost more than running it (0.5 ms a token check).
_PRINCIPAL_COLUMNS = (User.id, User.name, User.disabled, User.tokens_not_before, User.all_exchanges)
_PRINCIPALS = {
    KEY: select(*_PRINCIPAL_COLUMNS)
    .join(ApiKey, ApiKey.user_id == User.id)
    .where(ApiKey.key_id == bindparam("subject"), ApiKey.revoked.is_(False)),
    USER: select(*_PRINCIPAL_COLUMNS).where(User.name == bindparam("subject")),
}
_ENTITLED = select(Entitlement.exchange_code).where(Entitlement.user_id == bindparam("user_id"))
_ENDED = select(exists().where(EndedToken.token_id == bindparam("token_id")))


def _principal(connection: Connection, kind: str, subject: str) -> Principal | None:
    query = _PRINCIPALS.get(kind)
    if query is None:
        raise ValueError(f"unknown principal kind {kind!r}")
    row = connection.execute(query, {"subject": subject}).first()
    if row is None:
        return None
    user_id, name, disabled, not_before, all_exchanges = row
    exchanges = None
    if not all_exchanges:
        exchanges = frozenset(connection.scalars(_ENTITLED, {"user_id": user_id}))
    return Principal(
        user=name, exchanges=exchanges, disabled=disabled, tokens_not_before=not_before
    )


def _token_standing(
    connection: Connection, token_id: str, kind: str, subject: str
) -> tuple[bool, Principal | None]:
    if connection.scalar(_ENDED, {"token_id": token_id}):
        return True, None
    return False, _principal(connection, kind, subject)


class Store:
    """The database behind the service and its CLI.

    ``url`` is a SQLAlchemy async URL: ``sqlite+aiosqlite:///path`` or
    ``postgresql+asyncpg://user:pass@host/db``. Exchange codes are compared exactly.
    """

    def __init__(self, url: str) -> None:
        # One per store, hence per event loop: its semaphore belongs to the loop it waits in.
        #: Processes started by ``prepare`` in a server, threads at the first check elsewhere.
        self._hashers = hashing.Hashers()
        #: Set by ``upgrade``: the store had no schema, and was created empty.
        self.created = False
        try:
            self._url = make_url(url)
            options: dict[str, Any] = {}
            if _pooled(self._url):
                options |= {
                    "pool_size": POOL_SIZE,
                    "max_overflow": 0,
                    "pool_timeout": _POOL_TIMEOUT_S,
                }
            if self._url.get_backend_name() == "postgresql":
                # A server can drop connections; a SQLite file cannot, and a ping
                # there cost more trips to its thread on every token check.
                options["pool_pre_ping"] = True
                options["connect_args"] = {
                    "timeout": _PG_CONNECT_TIMEOUT,
                    "command_timeout": _PG_COMMAND_TIMEOUT,
                }
            self._engine: AsyncEngine = create_async_engine(self._url, **options)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            # A URL SQLAlchemy cannot use, or whose driver is not installed.
            raise ValueError(
                f"invalid database URL (want sqlite+aiosqlite:// or postgresql+asyncpg://): {exc}"
            ) from None
        if self._is_sqlite:
            _hook_sqlite(self._engine.sync_engine)
        #: File SQLite only: the thread and engine of :meth:`_read` (see there).
        self._reads: tuple[ThreadPoolExecutor, Engine] | None = None
        if self._is_sqlite and _pooled(self._url):
            engine = create_engine(self._url.set(drivername="sqlite"), pool_size=1, max_overflow=0)
            _hook_sqlite(engine)
            self._reads = (ThreadPoolExecutor(1, thread_name_prefix="caspian-store-reads"), engine)
        self._reader = async_sessionmaker(self._engine, expire_on_commit=False)
        self._writer = async_sessionmaker(
            self._engine, expire_on_commit=False, execution_options={_WRITE: True}
        )

    @property
    def _is_sqlite(self) -> bool:
        return self._url.get_backend_name() == "sqlite"

    @asynccontextmanager
    async def _session(self, *, write: bool = False) -> AsyncIterator[AsyncSession]:
        """A session in one transaction, committed when the block ends without error."""
        maker = self._writer if write else self._reader
        async with _availability(), maker() as session, session.begin():
            yield session

    async def _read(self, read: Callable[[Connection], _T]) -> _T:
        """``read(connection)`` in one transaction that only reads.

        On a SQLite file it runs whole in one thread of the store's, on a connection of
        its own: aiosqlite hands every cursor, fetch and commit to its thread and back
        (13 trips for a token check, 2.7 ms of CPU on this machine), where this makes
        one (0.5 ms). Elsewhere it runs on a connection of the async engine.
        """
        async with _availability():
            if self._reads is not None:
                thread, engine = self._reads
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(thread, _read_on, engine, read)
            async with self._engine.connect() as connection:
                return await connection.run_sync(read)

    async def upgrade(self) -> None:
        """Bring the schema to the latest migration; does nothing if it is there already.

        Sets ``created`` if the store had no schema: it was created empty just now (the
        CLI says so, for a user who meant another data directory).
        """
        database = self._url.database
        async with _availability():
            if self._is_sqlite and database and database != ":memory:":
                _private_sqlite(Path(database))
            async with self._engine.connect() as connection:
                await connection.execution_options(**{_WRITE: True})
                async with connection.begin():
                    self.created = await connection.run_sync(_migrate)

    async def prepare(self) -> None:
        """Opens every connection of the pool and starts the argon2 worker processes now,
        for a server: its descriptors, threads and processes are then there from the
        start, not added under the first burst of requests or logins."""
        await self._hashers.start_processes()
        if not _pooled(self._url):
            return
        await self._read(lambda _connection: None)
        async with _availability(), contextlib.AsyncExitStack() as held:
            for _ in range(POOL_SIZE):
                await held.enter_async_context(self._engine.connect())

    async def close(self) -> None:
        await self._hashers.close()
        await self._engine.dispose()
        if self._reads is not None:
            thread, engine = self._reads
            await asyncio.get_running_loop().run_in_executor(thread, engine.dispose)
            thread.shutdown()

    # Users

    async def create_user(self, name: str, password: str | None) -> UserInfo:
        """A user allowed every exchange; without a password they can only use keys."""
        _check_user_name(name)
        if password == "":
            raise ValueError("a password cannot be empty")
        password_hash = (
            None if password is None else await self._hashers.run(hashing.hash_secret, password)
        )
        user = User(
            name=name,
            password_hash=password_hash,
            all_exchanges=True,
            created_time=_now(),
            disabled=False,
        )
        try:
            async with self._session(write=True) as session:
                session.add(user)
        except IntegrityError as exc:
            raise AlreadyExists(f"user {name!r} already exists") from exc
        return _user_info(user, ())

    async def list_users(self) -> list[UserInfo]:
        async with self._session() as session:
            users = await session.scalars(select(User).order_by(User.name))
            granted: defaultdict[int, list[str]] = defaultdict(list)
            for user_id, code in await session.execute(
                select(Entitlement.user_id, Entitlement.exchange_code)
            ):
                granted[user_id].append(code)
            return [_user_info(user, granted[user.id]) for user in users]

    async def verify_credential(self, name: str, password: str) -> UserInfo | None:
        """The user, if the password is theirs and they are not disabled."""
        async with self._session() as session:
            user = await _find_user(session, name)
            exchanges = [] if user is None else await _entitled(session, user.id)
        stored_hash = None if user is None or user.disabled else user.password_hash
        if not await self._hashers.run(hashing.verify, stored_hash, password) or user is None:
            return None
        # Verifying takes a while: a password changed or a user disabled meanwhile must not
        # let the old password in, or its token would postdate the change and stay valid.
        async with self._session() as session:
            now = (
                await session.execute(
                    select(User.password_hash, User.disabled).where(User.id == user.id)
                )
            ).first()
        if now is None or tuple(now) != (stored_hash, False):
            return None
        return _user_info(user, exchanges)

    async def set_password(self, name: str, password: str) -> UserInfo:
        """Give the user a new password; every token issued to them so far stops working."""
        if password == "":
            raise ValueError("a password cannot be empty")
        password_hash = await self._hashers.run(hashing.hash_secret, password)
        async with self._session(write=True) as session:
            user = await _require_user(session, name)
            user.password_hash = password_hash
            user.tokens_not_before = _now()
            return _user_info(user, await _entitled(session, user.id))

    async def set_disabled(self, name: str, disabled: bool) -> UserInfo:
        """Disable a user (no login, no token works) or enable them again.

        Disabling also ends every token issued to the user so far, so enabling them again
        brings none of those back: they log in anew.
        """
        async with self._session(write=True) as session:
            user = await _require_user(session, name)
            if disabled and not user.disabled:
                user.tokens_not_before = _now()
            user.disabled = disabled
            return _user_info(user, await _entitled(session, user.id))

    async def grant(self, name: str, exchange: str | None) -> UserInfo:
        """Allow the user one more exchange, or every exchange (``exchange`` None)."""
        async with self._session(write=True) as session:
            user = await _require_user(session, name)
            if exchange is None:
                user.all_exchanges = True
                await session.execute(delete(Entitlement).where(Entitlement.user_id == user.id))
            elif not user.all_exchanges:
                await session.merge(Entitlement(user_id=user.id, exchange_code=exchange))
            return _user_info(user, await _entitled(session, user.id))

    async def revoke(self, name: str, exchange: str | None) -> UserInfo:
        """Take one exchange from the user, or every exchange (``exchange`` None).

        A user allowed every exchange keeps every other exchange known to the store.
        """
        async with self._session(write=True) as session:
            user = await _require_user(session, name)
            if exchange is None:
                await session.execute(delete(Entitlement).where(Entitlement.user_id == user.id))
            elif user.all_exchanges:
                others = await session.scalars(
                    select(Exchange.code).where(Exchange.code != exchange)
                )
                session.add_all(Entitlement(user_id=user.id, exchange_code=code) for code in others)
            else:
                await session.execute(
                    delete(Entitlement).where(
                        Entitlement.user_id == user.id, Entitlement.exchange_code == exchange
                    )
                )
            user.all_exchanges = False
            return _user_info(user, await _entitled(session, user.id))

    # API keys

    async def create_key(self, user: str) -> tuple[KeyInfo, str]:
        """A new key for the user, created without a password if missing.

        The secret is returned here only: the store keeps its hash.
        """
        _check_user_name(user)
        secret = secrets.token_urlsafe(_SECRET_BYTES)
        secret_hash = await self._hashers.run(hashing.hash_secret, secret)
        key_id = "".join(secrets.choice(KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
        now = _now()
        async with self._session(write=True) as session:
            owner = await _find_user(session, user)
            if owner is None:
                owner = User(
                    name=user,
                    password_hash=None,
                    all_exchanges=True,
                    created_time=now,
                    disabled=False,
                )
                session.add(owner)
                await session.flush()
            session.add(
                ApiKey(
                    key_id=key_id,
                    secret_hash=secret_hash,
                    user_id=owner.id,
                    created_time=now,
                    revoked=False,
                )
            )
        return KeyInfo(key_id=key_id, user=user, created_time=now, revoked=False), secret

    async def list_keys(self) -> list[KeyInfo]:
        async with self._session() as session:
            rows = await session.execute(
                select(ApiKey, User.name)
                .join(User, ApiKey.user_id == User.id)
                .order_by(ApiKey.created_time, ApiKey.key_id)
            )
            return [
                KeyInfo(
                    key_id=key.key_id, user=name, created_time=key.created_time, revoked=key.revoked
                )
                for key, name in rows
            ]

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke a key for good; False if there is no such key."""
        async with self._session(write=True) as session:
            key = await session.get(ApiKey, key_id)
            if key is None:
                return False
            key.revoked = True
            return True

    async def verify_key(self, key_id: str, secret: str) -> KeyInfo | None:
        """The key, if the secret is its own, it is not revoked and its user not disabled."""
        async with self._session() as session:
            row = (
                await session.execute(
                    select(ApiKey, User.name, User.disabled)
                    .join(User, ApiKey.user_id == User.id)
                    .where(ApiKey.key_id == key_id)
                )
            ).first()
        usable = row is not None and not row[0].revoked and not row[2]
        stored_hash = row[0].secret_hash if row is not None and usable else None
        if not await self._hashers.run(hashing.verify, stored_hash, secret) or row is None:
            return None
        key, name, _ = row
        return KeyInfo(key_id=key.key_id, user=name, created_time=key.created_time, revoked=False)

    async def principal(self, kind: str, subject: str) -> Principal | None:
        """Who a token's subject is now: None once the key is revoked or the user is gone.

        A disabled user is still found, marked so, for the caller to say why it refuses.
        """
        return await self._read(partial(_principal, kind=kind, subject=subject))

    # Tokens ended with their stream session

    async def end_token(self, token_id: str, expires_time: datetime) -> None:
        """Refuse the token from now on (until it expires: it is refused then anyway).

        Entries of tokens that have expired are dropped here, so the table holds no more
        than the ended tokens still alive.
        """
        async with self._session(write=True) as session:
            await session.execute(delete(EndedToken).where(EndedToken.expires_time < _now()))
            if await session.get(EndedToken, token_id) is None:
                session.add(EndedToken(token_id=token_id, expires_time=expires_time))

    async def token_standing(
        self, token_id: str, kind: str, subject: str
    ) -> tuple[bool, Principal | None]:
        """Whether the token was ended, and else its subject's :meth:`principal`.

        One transaction for both: every stream connect and REST call asks,
        and under connection churn these lookups were half the event loop's work.
        """
        return await self._read(
            partial(_token_standing, token_id=token_id, kind=kind, subject=subject)
        )

    # Registry of open stream sessions

    async def sync_gateway(
        self,
        gateway: GatewayInfo,
        opened: Iterable[SessionInfo],
        closed: Iterable[str],
        stale_after_s: float,
    ) -> GatewaySync:
        """Renew the gateway's registration and bring its sessions up to date, in one go.

        Marks the gateway seen now (registering it again if its row is gone), deletes its
        ``closed`` sessions, adds its ``opened`` ones, and purges every other gateway not
        seen for ``stale_after_s``, with its sessions. Adding a session already held is not
        an error: a sync whose commit the gateway could not confirm is simply sent again.
        """
        now = _now()
        async with self._session(write=True) as session:
            # Locked first, so that another gateway purging this one either finishes
            # before (the row is then gone) or skips it.
            row = await session.get(Gateway, gateway.id, with_for_update=True)
            if row is None:
                session.add(
                    Gateway(
                        id=gateway.id,
                        host=gateway.host,
                        pid=gateway.pid,
                        started_time=gateway.started_time,
                        seen_time=now,
                    )
                )
                await session.flush()
            else:
                row.seen_time = now
            # A locked row is a gateway syncing right now, so alive: skipping it rather
            # than waiting keeps two gateways back from an outage, each purging the other,
            # from deadlocking. SQLite locks the whole database instead and ignores this.
            stale = list(
                await session.scalars(
                    select(Gateway.id)
                    .where(
                        Gateway.id != gateway.id,
                        Gateway.seen_time < now - timedelta(seconds=stale_after_s),
                    )
                    .with_for_update(skip_locked=True)
                )
            )
            if stale:
                # The database's ON DELETE CASCADE takes their sessions.
                await session.execute(delete(Gateway).where(Gateway.id.in_(stale)))
            gone = list(closed)
            for start in range(0, len(gone), _IDS_PER_STATEMENT):
                await session.execute(
                    delete(StreamSession).where(
                        StreamSession.gateway_id == gateway.id,
                        StreamSession.id.in_(gone[start : start + _IDS_PER_STATEMENT]),
                    )
                )
            held = set(
                await session.scalars(
                    select(StreamSession.id).where(StreamSession.gateway_id == gateway.id)
                )
            )
            # One executemany, not ORM objects: after a mass reconnect this can be
            # thousands of rows, built on the event loop's thread.
            fresh = {info.id: info for info in opened if info.id not in held}
            if fresh:
                await session.execute(
                    insert(StreamSession),
                    [
                        {
                            "id": info.id,
                            "gateway_id": gateway.id,
                            "user_name": info.user,
                            "key_id": info.key_id,
                            "peer": info.peer,
                            "opened_time": info.opened_time,
                        }
                        for info in fresh.values()
                    ],
                )
                held.update(fresh)
        return GatewaySync(rejoined=row is None, sessions=frozenset(held))

    async def remove_gateway(self, gateway_id: str) -> None:
        """Take a gateway out of the registry, with its sessions: it is shutting down."""
        async with self._session(write=True) as session:
            await session.execute(delete(Gateway).where(Gateway.id == gateway_id))

    async def list_sessions(self, stale_after_s: float) -> list[RegisteredSession]:
        """The sessions of every gateway seen within ``stale_after_s``, oldest first."""
        cutoff = _now() - timedelta(seconds=stale_after_s)
        async with self._session() as session:
            rows = await session.execute(
                select(StreamSession, Gateway)
                .join(Gateway, StreamSession.gateway_id == Gateway.id)
                .where(Gateway.seen_time >= cutoff)
                .order_by(StreamSession.opened_time, StreamSession.id)
            )
            return [
                RegisteredSession(_session_info(stream), _gateway_info(gateway))
                for stream, gateway in rows
            ]

    async def end_session(self, session_id: str) -> bool:
        """End a session: its gateway closes it at its next sync. False if there is none."""
        async with self._session(write=True) as session:
            row = await session.get(StreamSession, session_id)
            if row is None:
                return False
            await session.delete(row)
            return True

    # Reference data

    async def seed_exchanges(self, exchanges: Iterable[tuple[str, str]]) -> None:
        """Add or rename exchanges, given as (name, code)."""
        names = {code: name for name, code in exchanges}
        async with self._session(write=True) as session:
            known = {
                row.code: row
                for row in await session.scalars(select(Exchange).where(Exchange.code.in_(names)))
            }
            for code, name in names.items():
                if code in known:
                    known[code].name = name
                else:
                    session.add(Exchange(code=code, name=name))

    async def list_exchanges(self) -> list[tuple[str, str]]:
        """Every exchange as (name, code), by code."""
        async with self._session() as session:
            rows = await session.scalars(select(Exchange).order_by(Exchange.code))
            return [(row.name, row.code) for row in rows]

    async def upsert_products(self, products: Iterable[ProductSpec]) -> tuple[int, int]:
        """Add new products and overwrite known ones; returns (created, updated).

        Every product given counts as updated when known, changed or not: its
        ``updated_time`` tells when the catalog last confirmed it. Raises ``NotFound`` for
        a product of an exchange the store does not know.
        """
        latest = {spec.caspian_code: spec for spec in products}
        wanted = {spec.exchange for spec in latest.values()}
        now = _now()
        created = updated = 0
        async with self._session(write=True) as session:
            known = set(
                await session.scalars(select(Exchange.code).where(Exchange.code.in_(wanted)))
            )
            if missing := wanted - known:
                raise NotFound(f"unknown exchanges: {', '.join(sorted(missing))}")
            # Loaded by exchange rather than by code: one bound parameter per exchange,
            # where a catalog has thousands of codes.
            rows = {
                row.caspian_code: row
                for row in await session.scalars(
                    select(Product).where(Product.exchange.in_(wanted))
                )
            }
            for code, spec in latest.items():
                values = {name: getattr(spec, name) for name in _SPEC_FIELDS}
                row = rows.get(code)
                if row is None:
                    session.add(Product(**values, created_time=now, updated_time=now))
                    created += 1
                else:
                    for name, value in values.items():
                        setattr(row, name, value)
                    row.updated_time = now
                    updated += 1
        return created, updated

    async def delete_products(self, caspian_codes: Collection[str]) -> int:
        """Remove the products of these codes (unknown ones are ignored); returns how many."""
        if not caspian_codes:
            return 0
        async with self._session(write=True) as session:
            rows = await session.scalars(
                select(Product).where(Product.caspian_code.in_(caspian_codes))
            )
            removed = 0
            for row in rows:
                await session.delete(row)
                removed += 1
            return removed

    async def has_products(self, exchange: str) -> bool:
        async with self._session() as session:
            found = await session.scalar(select(exists().where(Product.exchange == exchange)))
            return bool(found)

    async def products(self, exchanges: Sequence[str] | None = None) -> list[ProductRecord]:
        """Products of the given exchanges (None: of every exchange), by exchange and code."""
        query = select(Product).order_by(Product.exchange, Product.caspian_code)
        if exchanges is not None:
            query = query.where(Product.exchange.in_(exchanges))
        async with self._session() as session:
            return [_product_record(row) for row in await session.scalars(query)]

    async def product(self, caspian_code: str) -> ProductRecord | None:
        async with self._session() as session:
            row = await session.get(Product, caspian_code)
            return None if row is None else _product_record(row)
