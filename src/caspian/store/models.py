"""Tables of the store, as SQLAlchemy ORM models.

Times are naive GMT datetimes (see ``timefmt.us_to_dt``): both back ends keep them to the
microsecond, which the API shows. The schema itself is created by the Alembic migration
in ``migrations/versions``, which must describe exactly these tables (a test compares them).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    false,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Constraint names must be stable for migrations to refer to them on every back end.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

USER_NAME_LENGTH = 64
KEY_ID_LENGTH = 20
EXCHANGE_CODE_LENGTH = 32
PRODUCT_CODE_LENGTH = 128
#: Gateway and stream session ids: 8 random bytes in hex.
REGISTRY_ID_LENGTH = 16
#: A token's ``jti``: a UUID in hex.
TOKEN_ID_LENGTH = 32


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(USER_NAME_LENGTH), unique=True)
    # NULL for users made implicitly by key creation: they cannot log in with a Credential.
    password_hash: Mapped[str | None] = mapped_column(Text)
    all_exchanges: Mapped[bool] = mapped_column(Boolean, server_default=true())
    created_time: Mapped[datetime] = mapped_column(DateTime)
    #: A disabled user cannot log in, with its password or its keys, and no token of theirs works.
    disabled: Mapped[bool] = mapped_column(Boolean, server_default=false())
    #: The user's tokens issued before this no longer work: set by a password change and by
    #: disabling, so that enabling again brings no old token back. NULL: never set.
    tokens_not_before: Mapped[datetime | None] = mapped_column(DateTime)


class Entitlement(Base):
    """An exchange a user may see; consulted only while the user's ``all_exchanges`` is false."""

    __tablename__ = "entitlements"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    exchange_code: Mapped[str] = mapped_column(String(EXCHANGE_CODE_LENGTH), primary_key=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(KEY_ID_LENGTH), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(Text)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_time: Mapped[datetime] = mapped_column(DateTime)
    revoked: Mapped[bool] = mapped_column(Boolean, server_default=false())


class Exchange(Base):
    __tablename__ = "exchanges"

    code: Mapped[str] = mapped_column(String(EXCHANGE_CODE_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(Text)


class Product(Base):
    """One ``ProductSpec`` per row; the column attributes carry the spec's field names."""

    __tablename__ = "products"

    caspian_code: Mapped[str] = mapped_column(String(PRODUCT_CODE_LENGTH), primary_key=True)
    exchange: Mapped[str] = mapped_column(ForeignKey("exchanges.code"), index=True)
    type: Mapped[str] = mapped_column(Text)
    pseudo_code: Mapped[str] = mapped_column(Text)
    tora_code: Mapped[str] = mapped_column(Text)
    tora_market: Mapped[str] = mapped_column(Text)
    native_code: Mapped[str] = mapped_column(Text)
    native_code_v2: Mapped[str] = mapped_column(Text)
    ccy_from: Mapped[str] = mapped_column(Text)
    ccy_to: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    lot_size: Mapped[str] = mapped_column(Text)
    tick_size: Mapped[str] = mapped_column(Text)
    tick_rule: Mapped[str] = mapped_column(Text)
    multiplier: Mapped[str | None] = mapped_column(Text)
    expire_date: Mapped[str | None] = mapped_column(Text)
    last_trading_date: Mapped[str | None] = mapped_column(Text)
    strike: Mapped[str | None] = mapped_column(Text)
    underlying_caspian_code: Mapped[str | None] = mapped_column(Text)
    created_time: Mapped[datetime] = mapped_column(DateTime)
    updated_time: Mapped[datetime] = mapped_column(DateTime)


class Gateway(Base):
    """A running gateway process, in the cluster's registry of stream sessions.

    ``seen_time`` is renewed by each of its syncs; a row not renewed for long is a gateway
    that died without saying so, purged by the others along with its sessions.
    """

    __tablename__ = "gateways"

    id: Mapped[str] = mapped_column(String(REGISTRY_ID_LENGTH), primary_key=True)
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    started_time: Mapped[datetime] = mapped_column(DateTime)
    seen_time: Mapped[datetime] = mapped_column(DateTime)


class StreamSession(Base):
    """An open stream connection, as its gateway last reported it.

    Deleting the row ends the session: its gateway closes it (3003) at its next sync.
    """

    __tablename__ = "stream_sessions"

    id: Mapped[str] = mapped_column(String(REGISTRY_ID_LENGTH), primary_key=True)
    gateway_id: Mapped[str] = mapped_column(
        ForeignKey("gateways.id", ondelete="CASCADE"), index=True
    )
    # Not foreign keys: the registry records who connected, it does not own users or keys.
    user_name: Mapped[str] = mapped_column(String(USER_NAME_LENGTH))
    #: NULL for a session opened with a Credential login's token.
    key_id: Mapped[str | None] = mapped_column(String(KEY_ID_LENGTH))
    #: The client's address, ``ip:port``.
    peer: Mapped[str] = mapped_column(Text)
    opened_time: Mapped[datetime] = mapped_column(DateTime)


class EndedToken(Base):
    """The token of a stream session ended on the server: refused from then on.

    Kept only until the token expires, after which it is refused anyway.
    """

    __tablename__ = "ended_tokens"

    token_id: Mapped[str] = mapped_column(String(TOKEN_ID_LENGTH), primary_key=True)
    expires_time: Mapped[datetime] = mapped_column(DateTime, index=True)
