"""Python client for the Caspian API v1.

async with Client("http://127.0.0.1:8080", key_id=..., secret=...) as client:
    async with client.stream() as stream:
        async for update in stream.level2("FX-BTC/USD=GEMINI", levels=5):
            print(update.book.best_bid, update.book.best_ask)
"""

from caspian_client.backoff import Backoff
from caspian_client.book import Book, BookKeeper, Level2Update, PriceLevel
from caspian_client.client import Client
from caspian_client.errors import (
    AuthenticationError,
    CaspianError,
    HTTPError,
    ProtocolError,
    RequestTimeout,
    ServiceUnavailable,
    StreamClosed,
    SubscriptionError,
    TokenRefreshError,
    Unreachable,
    UnsubscribeError,
)
from caspian_client.models import Exchange, Level1, Level2Message, LevelChange, Product, Token
from caspian_client.stream import (
    Connected,
    Disconnected,
    Event,
    Lapsed,
    Level1Subscription,
    Level2Subscription,
    Reconnecting,
    ServerProblem,
    StatusChanged,
    Stream,
    TokenRefreshed,
)
from caspian_client.sync import SyncClient, SyncStream

__all__ = [
    "AuthenticationError",
    "Backoff",
    "Book",
    "BookKeeper",
    "CaspianError",
    "Client",
    "Connected",
    "Disconnected",
    "Event",
    "Exchange",
    "HTTPError",
    "Lapsed",
    "Level1",
    "Level1Subscription",
    "Level2Message",
    "Level2Subscription",
    "Level2Update",
    "LevelChange",
    "PriceLevel",
    "Product",
    "ProtocolError",
    "Reconnecting",
    "RequestTimeout",
    "ServerProblem",
    "ServiceUnavailable",
    "StatusChanged",
    "Stream",
    "StreamClosed",
    "SubscriptionError",
    "SyncClient",
    "SyncStream",
    "Token",
    "TokenRefreshError",
    "TokenRefreshed",
    "Unreachable",
    "UnsubscribeError",
]
