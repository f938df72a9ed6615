"""The 22 exchanges of the Caspian API, and where ccxt knows them."""

from __future__ import annotations

#: (name, code) of every supported exchange, in the contract's order.
EXCHANGES: tuple[tuple[str, str], ...] = (
    ("Binance", "BINANCE"),
    ("Bitfinex", "BITFINEX"),
    ("Bitflyer", "BITFLYER"),
    ("Bithumb", "BITHUMB"),
    ("Bitmex", "BITMEX"),
    ("Bitstamp", "BITSTAMP"),
    ("Bittrex", "BITTREX"),
    ("BTCC", "BTCC"),
    ("CEX", "CEX"),
    ("Coinbase Pro (GDAX)", "GDAX"),
    ("CoinOne", "COINONE"),
    ("Deribit", "DERIBIT"),
    ("Gemini", "GEMINI"),
    ("Hitbtc", "HITBTC"),
    ("Huobi", "HUOBI"),
    ("ItBit", "ITBIT"),
    ("Korbit", "KORBIT"),
    ("Kraken", "KRAKEN"),
    ("Kucoin", "KUCOIN"),
    ("Liquid", "LIQUID"),
    ("OKEx", "OKEX"),
    ("Poloniex", "POLONIEX"),
)

#: Caspian exchange code -> the name of its bundled ccxt markets file (the ccxt
#: id when the file was made). BTCC, ItBit, Korbit and Liquid have none: ccxt
#: dropped them, so their products are hand-written.
CCXT_FILES: dict[str, str] = {
    "BINANCE": "binance",
    "BITFINEX": "bitfinex",
    "BITFLYER": "bitflyer",
    "BITHUMB": "bithumb",
    "BITMEX": "bitmex",
    "BITSTAMP": "bitstamp",
    "BITTREX": "bittrex",
    "CEX": "cex",
    "GDAX": "coinbaseexchange",
    "COINONE": "coinone",
    "DERIBIT": "deribit",
    "GEMINI": "gemini",
    "HITBTC": "hitbtc",
    "HUOBI": "huobi",
    "KRAKEN": "kraken",
    "KUCOIN": "kucoin",
    "OKEX": "okx",
    "POLONIEX": "poloniex",
}

#: Caspian exchange code -> exchange id in the ccxt this project installs, for
#: fetching markets and streaming live. ccxt renamed Huobi to HTX and no longer
#: ships BitMEX or Bittrex (closed in 2023).
CCXT_IDS: dict[str, str] = {
    code: {"HUOBI": "htx"}.get(code, file_id)
    for code, file_id in CCXT_FILES.items()
    if code not in ("BITMEX", "BITTREX")
}
