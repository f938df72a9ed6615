"""The order-book engine: price levels in, top-N views and their changes out."""

from caspian.book.orderbook import EMPTY_VIEW, BookView, LevelChange, OrderBook, diff_views

__all__ = ["EMPTY_VIEW", "BookView", "LevelChange", "OrderBook", "diff_views"]
