"""The database: users, API keys, exchanges, products and open stream sessions (see
``store.Store``)."""

from caspian.store.store import (
    KEY,
    USER,
    AlreadyExists,
    GatewayInfo,
    GatewaySync,
    KeyInfo,
    NotFound,
    Principal,
    ProductRecord,
    RegisteredSession,
    SessionInfo,
    Store,
    StoreError,
    StoreUnavailable,
    UserInfo,
)

__all__ = [
    "KEY",
    "USER",
    "AlreadyExists",
    "GatewayInfo",
    "GatewaySync",
    "KeyInfo",
    "NotFound",
    "Principal",
    "ProductRecord",
    "RegisteredSession",
    "SessionInfo",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "UserInfo",
]
