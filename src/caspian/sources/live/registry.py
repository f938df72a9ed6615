"""The exchange registry: one record per Caspian exchange, and every list derived from it.

The product catalog (names, codes, ccxt market files and ids), the live
source (which client streams an exchange, with which checks) and the README's
exchange table all read these records; an exchange is added here once.

How an exchange is reached (:attr:`Exchange.client`):

- ``"ccxt_pro"``: ccxt.pro, one connection per watched symbol
  (:mod:`caspian.sources.live.ccxt_pro`), every raw message applied by ccxt
  and turned into a diff of the top levels at once, with Caspian's own checks
  where ccxt has none;
- a module name (``"binance"``, ``"bitmex"``, ``"bitflyer"``, ``"korbit"``,
  ``"paxos"``): Caspian's own client in ``caspian.sources.live.<module>``,
  parsing the exchange's messages into diffs directly;
- None: not streamed, :attr:`Exchange.notes` says why.

The choice was made by measurement. Before this package, on a Binance-format
feed, ccxt.pro alone spent 56-70 µs of CPU per event at 10k events/s,
cryptofeed 17-24 µs, orjson plus a dict book 10-17 µs; ccxt rebuilds its own
book on every message and cannot unsubscribe on most exchanges. So the
busiest exchange, Binance, has Caspian's own client with a shared
connection; the others stay on ccxt.pro, except those ccxt.pro does not
stream (BitMEX, bitFlyer, Korbit, Paxos), which have Caspian's own too.
Binance's client reads its WebSocket with Caspian's own feed client
(:mod:`caspian.sources.live.wsclient`), which handles each message as its
bytes arrive: against aiohttp's client (1.8 µs a message, 5 for
``websockets``) it spares a queue and a task wake-up per read, about 2 µs a
message and 25 µs a wake-up. It decodes events
with msgspec straight into typed structs (1.2 µs against 4 for ``orjson``
and converting each level in Python). bench/bench_live.py measures it
against cryptofeed: the live source alone spends half to two thirds of
cryptofeed's CPU per event at 10k events/s and takes more events a second;
the whole service (source, gateway and a Level2 subscriber) 0.91 to 1.05
times its CPU per event (four runs, 2026-12-03; the same user CPU and more
system CPU, for writing to its client) and saturates at a higher rate
(bench/README.md). ccxt remains the source of reference data for all of
them.

This module imports neither ccxt nor any client, so the catalog stays cheap
to import.
"""

from __future__ import annotations

from dataclasses import dataclass

from caspian.sources.integrity import KucoinSequence, OkxChecksum, is_bitfinex_checksum
from caspian.sources.live.adapter import (
    Adapter,
    bitfinex_check,
    bitfinex_without_history,
    coinbase_book,
    coinone_taker_side,
    deribit_check,
    gemini_without_history,
    kraken_check,
    poloniex_check,
)

CCXT = "ccxt_pro"


@dataclass(frozen=True, slots=True)
class Exchange:
    """One of the 22 exchanges of the Caspian API."""

    code: str
    name: str
    #: The bundled ccxt markets file (src/caspian/catalog/data), or None when
    #: its products are written by hand.
    markets_file: str | None
    #: Its id in the installed ccxt, for reference data, or None when ccxt
    #: no longer ships it.
    ccxt_id: str | None
    #: ``"ccxt_pro"``, the module of Caspian's own client, or None (module docs).
    client: str | None
    #: The ccxt.pro options of a ``"ccxt_pro"`` exchange.
    adapter: Adapter | None = None
    #: The integrity checks run on its book, and who runs them.
    checks: tuple[str, ...] = ()
    #: Protocol notes, or why it is not streamed.
    notes: str = ""

    def __post_init__(self) -> None:
        if (self.client == CCXT) != (self.adapter is not None):
            raise ValueError(f"{self.code}: an adapter goes with the ccxt client, and only there")

    @property
    def live(self) -> bool:
        return self.client is not None


_CROSSED = "crossed book (Caspian)"

#: In the contract's order.
EXCHANGES: tuple[Exchange, ...] = (
    Exchange(
        "BINANCE",
        "Binance",
        "binance",
        "binance",
        "binance",
        checks=("update-id chain U/u against the REST snapshot (Caspian)", _CROSSED),
        notes="Spot: diff depth @100ms after a REST snapshot, one connection for up to 512 "
        "watched symbols (Binance's 1,024 streams), subscribed and unsubscribed on the fly, "
        "read by Caspian's own WebSocket client (`caspian.sources.live.wsclient`: each message "
        "handled as its bytes arrive, at most 32 an event-loop turn, reading paused while more "
        "wait). Futures and perpetuals: ccxt.pro, which checks their update ids.",
    ),
    Exchange(
        "BITFINEX",
        "Bitfinex",
        "bitfinex",
        "bitfinex",
        CCXT,
        Adapter(
            "bitfinex",
            # 25 levels a side unless asked for 100, the most Bitfinex sends.
            book_limit=100,
            prepare=bitfinex_without_history,
            check=bitfinex_check,
            settles=is_bitfinex_checksum,
        ),
        checks=("CRC32 checksum of the top 25 (ccxt and Caspian)", _CROSSED),
    ),
    Exchange(
        "BITFLYER",
        "Bitflyer",
        "bitflyer",
        "bitflyer",
        "bitflyer",
        checks=(
            "every board snapshot replaces the book, healing a lost change (Caspian)",
            _CROSSED,
        ),
        notes="ccxt.pro does not stream bitFlyer: its JSON-RPC 2.0 WebSocket through Caspian's "
        "own client, native product codes (BTC_JPY, FX_BTC_JPY), board snapshots and changes, "
        "executions. bitFlyer numbers nothing, so a lost change shows only when the next "
        "snapshot heals it or the book crosses.",
    ),
    Exchange(
        "BITHUMB",
        "Bithumb",
        "bithumb",
        "bithumb",
        CCXT,
        # Bithumb sends its latest trade on subscribing unless asked not to.
        Adapter("bithumb", trade_params={"is_only_realtime": True}),
        checks=(_CROSSED,),
        notes="orderbookdepth messages carry no sequence number, only a time, so a lost change "
        "shows only if the book crosses.",
    ),
    Exchange(
        "BITMEX",
        "Bitmex",
        "bitmex",
        None,
        "bitmex",
        checks=("changes only to levels announced before (Caspian)", _CROSSED),
        notes="ccxt dropped BitMEX: orderBookL2 and trade tables through Caspian's own client, "
        "native ids (XBTUSD), text pings every 5 s.",
    ),
    Exchange(
        "BITSTAMP",
        "Bitstamp",
        "bitstamp",
        "bitstamp",
        CCXT,
        Adapter("bitstamp"),
        checks=(_CROSSED,),
        notes="diff_order_book carries no sequence number, only a microtimestamp, which ccxt "
        "uses to drop changes older than its REST snapshot; a lost change shows only if the "
        "book crosses.",
    ),
    Exchange(
        "BITTREX",
        "Bittrex",
        "bittrex",
        None,
        None,
        notes="the exchange closed in December 2023",
    ),
    Exchange(
        "BTCC",
        "BTCC",
        None,
        None,
        None,
        notes="the exchange closed the spot market the API knew in 2017; ccxt dropped it",
    ),
    Exchange(
        "CEX",
        "CEX",
        "cex",
        "cex",
        None,
        notes="CEX.IO streams its order book to authenticated connections only (ccxt.pro's "
        "watch_order_book logs in first), and Caspian holds no exchange credentials",
    ),
    Exchange(
        "GDAX",
        "Coinbase Pro (GDAX)",
        "coinbaseexchange",
        "coinbaseexchange",
        CCXT,
        Adapter(
            "coinbaseexchange",
            watch_book=coinbase_book,
            info_fields=("maker_order_id", "taker_order_id", "sequence"),
        ),
        checks=(_CROSSED,),
        notes="level2_batch (the public channel) and heartbeats. Its snapshot and l2update "
        "messages carry no sequence number (only the full channel's do), so a lost change "
        "shows only if the book crosses.",
    ),
    Exchange(
        "COINONE",
        "CoinOne",
        "coinone",
        "coinone",
        CCXT,
        Adapter("coinone", prepare=coinone_taker_side),
        checks=(_CROSSED,),
        notes="ORDERBOOK sends the whole top of the book on every change, so a message lost "
        "is repaired by the next (its id only grows, and one TCP connection cannot reorder "
        "them); ccxt's reading of is_seller_maker is turned around (a resting seller means a "
        "buying taker).",
    ),
    Exchange(
        "DERIBIT",
        "Deribit",
        "deribit",
        "deribit",
        CCXT,
        Adapter(
            "deribit",
            info_fields=("trade_seq", "tick_direction", "mark_price", "index_price"),
            check=deribit_check,
        ),
        checks=("change_id/prev_change_id chain (Caspian)", _CROSSED),
    ),
    Exchange(
        "GEMINI",
        "Gemini",
        "gemini",
        "gemini",
        CCXT,
        Adapter("gemini", prepare=gemini_without_history),
        checks=(_CROSSED,),
        notes="Market data v2 l2 subscription; the trades replayed on subscribing are dropped. "
        "v2's l2_updates carry no sequence number (v1's socket_sequence is gone), so a lost "
        "change shows only if the book crosses.",
    ),
    Exchange(
        "HITBTC",
        "Hitbtc",
        "hitbtc",
        "hitbtc",
        CCXT,
        Adapter("hitbtc"),
        checks=(_CROSSED,),
        notes="orderbook/full numbers its messages (s), but HitBTC promises only that the "
        "numbers grow, so a lost message cannot be told from a jump and is not checked.",
    ),
    Exchange(
        "HUOBI",
        "Huobi",
        "huobi",
        "htx",
        CCXT,
        # ccxt takes the legacy trade id, wider than 64 bits and so parsed
        # as a float; tradeId is the exchange's own.
        Adapter(
            "htx", info_fields=("tradeId",), trade_id_field="tradeId", checksum_reason="sequence"
        ),
        checks=("seqNum/prevSeqNum chain (ccxt)", _CROSSED),
        notes="ccxt renamed Huobi to HTX. mbp.150 on /feed (snapshot by req on the same "
        "connection), trade.detail on /ws; gzip frames, server pings.",
    ),
    Exchange(
        "ITBIT",
        "ItBit",
        None,
        None,
        "paxos",
        checks=(_CROSSED,),
        notes="itBit became Paxos, which ccxt never had: its public marketdata/{market} and "
        "executiondata/{market} WebSockets through Caspian's own client, Paxos market ids "
        "(BTCUSD). Neither feed is numbered and executions name no taker side; the execution "
        "replayed on connecting is dropped by its time.",
    ),
    Exchange(
        "KORBIT",
        "Korbit",
        None,
        None,
        "korbit",
        checks=("every orderbook message is the whole top 30 (Caspian)", _CROSSED),
        notes="ccxt dropped Korbit (now Digital X, which keeps its addresses): v2 public "
        "WebSocket through Caspian's own client, native ids (btc_krw), orderbook and trade "
        "channels. No sequence: a message dropped under load is repaired by the next, whole one; "
        "30 levels a side.",
    ),
    Exchange(
        "KRAKEN",
        "Kraken",
        "kraken",
        "kraken",
        CCXT,
        Adapter(
            "kraken",
            book_limit=100,
            # Kraken replays its last 50 trades on subscribing unless told not to.
            trade_params={"snapshot": False},
            info_fields=("ord_type",),
            check=kraken_check,
        ),
        checks=("CRC32 checksum of the top 10 (Caspian)", _CROSSED),
        notes="WebSocket v2; the checksum covers the top 10 levels only.",
    ),
    Exchange(
        "KUCOIN",
        "Kucoin",
        "kucoin",
        "kucoin",
        CCXT,
        Adapter(
            "kucoin",
            info_fields=("makerOrderId", "takerOrderId", "sequence"),
            check=KucoinSequence.for_market,
        ),
        checks=("sequenceStart/sequenceEnd chain (Caspian)", _CROSSED),
        notes="Classic public WebSocket: a token from POST /api/v1/bullet-public first; "
        "the book waits for ccxt's REST snapshot, taken after 5 cached updates.",
    ),
    Exchange(
        "LIQUID",
        "Liquid",
        None,
        None,
        None,
        notes="the exchange closed in 2022 when FTX, its owner, collapsed; ccxt dropped it",
    ),
    Exchange(
        "OKEX",
        "OKEx",
        "okx",
        "okx",
        CCXT,
        Adapter("okx", info_fields=("count",), check=OkxChecksum.for_market),
        checks=(
            "seqId/prevSeqId chain (ccxt)",
            "CRC32 checksum of the top 25, while OKX still sends it (Caspian)",
            _CROSSED,
        ),
        notes="books (400 levels) and trades on /ws/v5/public; text pings.",
    ),
    Exchange(
        "POLONIEX",
        "Poloniex",
        "poloniex",
        "poloniex",
        CCXT,
        Adapter("poloniex", check=poloniex_check),
        checks=("book_lv2 id/lastId chain (Caspian)", _CROSSED),
    ),
)

BY_CODE: dict[str, Exchange] = {exchange.code: exchange for exchange in EXCHANGES}


def parse_exchanges(text: str) -> list[str]:
    """``"gemini, KRAKEN"`` -> ``["GEMINI", "KRAKEN"]``; unknown or unstreamed codes raise."""
    codes = [code.strip().upper() for code in text.split(",") if code.strip()]
    if not codes:
        raise ValueError("name the exchanges: live:EXCHANGE,...")
    for code in codes:
        exchange = BY_CODE.get(code)
        if exchange is None:
            live = ", ".join(e.code for e in EXCHANGES if e.live)
            raise ValueError(f"unknown exchange {code!r}; live supports {live}")
        if not exchange.live:
            raise ValueError(f"cannot stream {code} live: {exchange.notes}")
    return codes
