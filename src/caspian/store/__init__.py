"""The database: users, API keys, exchanges and products (see ``store.Store``)."""

from caspian.store.store import (
    KEY,
    USER,
    AlreadyExists,
    KeyInfo,
    NotFound,
    Principal,
    ProductRecord,
    Store,
    StoreError,
    StoreUnavailable,
    UserInfo,
)

__all__ = [
    "KEY",
    "USER",
    "AlreadyExists",
    "KeyInfo",
    "NotFound",
    "Principal",
    "ProductRecord",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "UserInfo",
]
