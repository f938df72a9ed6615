"""Currency codes as Caspian writes them, and their names for product descriptions."""

from __future__ import annotations

#: Exchange spellings of a currency -> the code Caspian uses for it. Codes
#: must not depend on the exchange: BitMEX, Kraken, itBit and Kucoin say XBT
#: where everyone else says BTC.
_ALIASES: dict[str, str] = {
    "XBT": "BTC",
    "XDG": "DOGE",
}

_NAMES: dict[str, str] = {
    # Fiat currencies
    "AUD": "Australian Dollar",
    "BRL": "Brazilian Real",
    "CAD": "Canadian Dollar",
    "CHF": "Swiss Franc",
    "CNY": "Chinese Yuan",
    "EUR": "Euro",
    "GBP": "British Pound",
    "HKD": "Hong Kong Dollar",
    "IDR": "Indonesian Rupiah",
    "INR": "Indian Rupee",
    "JPY": "Japanese Yen",
    "KRW": "South Korean Won",
    "PHP": "Philippine Peso",
    "PLN": "Polish Zloty",
    "RUB": "Russian Ruble",
    "SGD": "Singapore Dollar",
    "TRY": "Turkish Lira",
    "UAH": "Ukrainian Hryvnia",
    "USD": "US Dollar",
    # Stablecoins
    "BUSD": "Binance USD",
    "DAI": "Dai",
    "EURT": "Euro Tether",
    "GUSD": "Gemini Dollar",
    "PAX": "Paxos Standard",
    "TUSD": "TrueUSD",
    "USDC": "USD Coin",
    "USDT": "Tether",
    # Crypto currencies
    "AAVE": "Aave",
    "ADA": "Cardano",
    "ATOM": "Cosmos",
    "AVAX": "Avalanche",
    "BAT": "Basic Attention Token",
    "BCH": "Bitcoin Cash",
    "BNB": "Binance Coin",
    "BSV": "Bitcoin SV",
    "BTC": "Bitcoin",
    "BTG": "Bitcoin Gold",
    "DASH": "Dash",
    "DOGE": "Dogecoin",
    "DOT": "Polkadot",
    "EOS": "EOS",
    "ETC": "Ethereum Classic",
    "ETH": "Ethereum",
    "FIL": "Filecoin",
    "LINK": "Chainlink",
    "LTC": "Litecoin",
    "MATIC": "Polygon",
    "NEO": "NEO",
    "OMG": "OmiseGO",
    "PAXG": "PAX Gold",
    "QASH": "QASH",
    "QTUM": "Qtum",
    "SHIB": "Shiba Inu",
    "SOL": "Solana",
    "SUSHI": "SushiSwap",
    "TRX": "TRON",
    "UNI": "Uniswap",
    "XLM": "Stellar",
    "XMR": "Monero",
    "XRP": "Ripple",
    "XTZ": "Tezos",
    "ZEC": "Zcash",
    "ZRX": "0x",
}


def normalize_currency(code: str) -> str:
    """The Caspian code of an exchange's currency code: upper-case, aliases resolved."""
    upper = code.upper()
    return _ALIASES.get(upper, upper)


def currency_name(code: str) -> str:
    """The currency's English name; an unknown currency is named by its code."""
    normalized = normalize_currency(code)
    return _NAMES.get(normalized, normalized)
