"""A product of the reference data, as the catalog builds it and the store keeps it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from caspian.catalog.currencies import normalize_currency
from caspian.timefmt import parse_us

#: Product types, the first part of a Caspian code.
PRODUCT_TYPES = ("FX", "FUT", "PERP", "OPT")


@dataclass(frozen=True, slots=True)
class ProductSpec:
    """Every field of the original's product record except the store-kept times.

    Decimal quantities are strings, as the API shows them (``"0.000001"``).
    """

    exchange: str
    type: str
    caspian_code: str
    pseudo_code: str
    tora_code: str
    tora_market: str
    native_code: str
    native_code_v2: str
    ccy_from: str
    ccy_to: str
    description: str
    lot_size: str
    tick_size: str
    tick_rule: str
    multiplier: str | None = None
    expire_date: str | None = None
    last_trading_date: str | None = None
    strike: str | None = None
    underlying_caspian_code: str | None = None

    @property
    def expires_us(self) -> int | None:
        """When the product stops trading, in µs since the epoch; None for undated ones."""
        return parse_us(self.expire_date) if self.expire_date is not None else None

    def expired(self, now_us: int) -> bool:
        expires = self.expires_us
        return expires is not None and now_us >= expires

    @property
    def price_currency(self) -> str:
        """The currency the product's prices, tick and tick rule are in.

        The quote currency, except for options settled in their base currency
        (Deribit's and OKX's coin options): their premium is paid in the base,
        so ``OPT-BTC/USD-...=DERIBIT`` trades at 0.0345 BTC, not at dollars.
        ``nativeCode_v2`` is ccxt's unified symbol, ``BASE/QUOTE:SETTLE-...``.
        """
        if self.type != "OPT":
            return self.ccy_to
        _, colon, rest = self.native_code_v2.partition(":")
        settle = rest.partition("-")[0]
        if colon and settle and normalize_currency(settle) == self.ccy_from:
            return self.ccy_from
        return self.ccy_to

    def api_fields(self) -> dict[str, Any]:
        """The product's fields under their API names; absent ones left out."""
        fields = {
            "caspianCode": self.caspian_code,
            "pseudoCode": self.pseudo_code,
            "toraCode": self.tora_code,
            "toraMarket": self.tora_market,
            "nativeCode": self.native_code,
            "nativeCode_v2": self.native_code_v2,
            "ccyFrom": self.ccy_from,
            "ccyTo": self.ccy_to,
            "description": self.description,
            "lotSize": self.lot_size,
            "tickRule": self.tick_rule,
            "exchange": self.exchange,
            "type": self.type,
            "multiplier": self.multiplier,
            "expireDate": self.expire_date,
            "lastTradingDate": self.last_trading_date,
            "strike": self.strike,
            "underlyingCaspianCode": self.underlying_caspian_code,
        }
        return {key: value for key, value in fields.items() if value is not None}
