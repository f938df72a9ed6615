"""Real exchanges: ``CASPIAN_SOURCE=live:GEMINI,KRAKEN,...``.

::

    source = LiveSource(["KRAKEN", "BINANCE"], catalog.get)
    task = asyncio.create_task(source.run(sink))
    source.watch("FX-BTC/USD=KRAKEN")

The package, by layer:

- :mod:`.registry`: one record per exchange (code, name, reference data,
  which client streams it, which checks run), from which every list of
  exchanges in the service is derived;
- :mod:`.source`: :class:`LiveSource`, which routes watched symbols to one
  client per exchange, and the shared backoff;
- :mod:`.feed`: :class:`SymbolFeed`, the rules every client follows to turn
  a symbol's book changes, trades and failures into events: snapshot then
  changes to the top, ``disconnected`` at once on a failure, and never
  ``connected`` while the feed runs more than ``CASPIAN_LIVE_MAX_LAG_S``
  behind the exchange;
- the clients: :mod:`.ccxt_pro` (ccxt.pro, a connection per symbol),
  :mod:`.binance`, :mod:`.bitmex`, :mod:`.bitflyer`, :mod:`.korbit` and
  :mod:`.paxos` (Caspian's own; all but Binance on :mod:`.native`'s
  one-symbol connections);
- :mod:`caspian.sources.integrity`: the pure checks of books that clients
  run on the exchanges' sequence numbers and checksums.

Tests and proxies point an exchange elsewhere with ``urls``, or the
``CASPIAN_LIVE_URLS`` environment variable holding the same JSON (CONTRACT.md
section 7): per Caspian exchange code, values merged into the exchange's
``urls`` in ccxt's layout, e.g.
``{"GDAX": {"api": {"ws": "ws://127.0.0.1:9000", "public": "http://127.0.0.1:9000"}}}``;
Caspian's own clients read the same keys ccxt does for their exchange
(BitMEX, which ccxt does not describe, takes ``{"api": {"ws": ..., "rest": ...}}``;
bitFlyer, Korbit and Paxos ``{"api": {"ws": base}}``, the base replacing the
exchange's and keeping its paths).
"""

from caspian.sources.live.registry import BY_CODE, EXCHANGES, Exchange, parse_exchanges
from caspian.sources.live.source import (
    LIVE_URLS_ENV,
    LiveSource,
    backoff_delay,
    urls_from_env,
)

__all__ = [
    "BY_CODE",
    "EXCHANGES",
    "LIVE_URLS_ENV",
    "Exchange",
    "LiveSource",
    "backoff_delay",
    "parse_exchanges",
    "urls_from_env",
]
