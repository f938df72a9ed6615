"""Products from ccxt market definitions (a markets JSON file, or ``load_markets()``).

ccxt market types map to product types: spot -> FX, swap -> PERP, future -> FUT,
option -> OPT. Markets of other types, inactive ones (``active`` is false) and
ones missing what a product needs (an id, base, quote, steps, an expiry, ...)
are skipped.

Rules the ccxt data does not decide by itself:

- **Tick rule.** ``tickRule`` is a list of ranges joined by ``;``, each range
  ``from,to,tick``: prices ``p`` with ``from <= p < to`` are multiples of
  ``tick``; an empty ``from`` or ``to`` is unbounded. A market with one tick
  everywhere has ``,,0.01``, as in the original's example. Deribit's
  ``tick_size_steps`` (a coarser tick above a price) give more ranges
  (``,0.005,0.0001;0.005,,0.0005``), so do significant-digit prices (Bitfinex).
  ``tickSize`` is the finest tick of the rule, the grid every price is on.
- **Underlying.** A derivative's ``underlyingCaspianCode`` names a product of
  the same exchange's markets that its price follows: the spot pair of its
  base/quote (``FUT-BTC/USDT-2023DEC29=BINANCE`` -> ``FX-BTC/USDT=BINANCE``)
  or, for a dated future or an option of an exchange with no such pair, the
  perpetual of that base/quote (Deribit's options -> ``PERP-BTC/USD=DERIBIT``).
  With neither it is absent: a code that answers 404 would tell clients less
  than none (BitMEX's ``XBTUSD`` follows an index, not a market).
- **Duplicates.** Caspian codes name base and quote but not the settlement
  currency, so a linear and an inverse contract can share one. The inverse one
  (settled in the base currency, as BitMEX's ``XBTUSD`` and the other contracts
  of the original's time) is kept, then the linear one (settled in the quote),
  then any other; ties go to the smaller ccxt symbol. A Pseudo code is ambiguous
  in principle (``ABCD`` is AB/CD and ABC/D); of two products with one Pseudo
  code the one with the smaller Caspian code is kept.
- **Native codes.** ``nativeCode`` is the market's ``id`` as the exchange spells
  it (``XBTUSD``, ``ethusd``), except on Coinone, whose ccxt id is not a symbol.
- **Dates.** ``expireDate`` and ``lastTradingDate`` are both the market's
  ``expiry``: ccxt does not tell the last trading time apart.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable, Mapping
from dataclasses import replace
from datetime import date
from decimal import Decimal
from enum import IntEnum
from typing import Any

from caspian.catalog.currencies import currency_name, normalize_currency
from caspian.catalog.exchanges import EXCHANGES
from caspian.catalog.product import ProductSpec
from caspian.catalog.symbols import SymbolParts, format_expiry, plain_decimal, to_decimal
from caspian.timefmt import format_us, us_to_dt

log = logging.getLogger(__name__)


class PrecisionMode(IntEnum):
    """How a markets object writes ``precision``; the values are ccxt's own constants,
    so ``PrecisionMode(exchange.precisionMode)`` converts a live exchange's."""

    #: ``precision`` counts decimal places (2 -> step 0.01).
    DECIMAL_PLACES = 2
    #: The price keeps that many significant digits (its tick grows with the price);
    #: exchanges in this mode count amounts in decimal places.
    SIGNIFICANT_DIGITS = 3
    #: ``precision`` is the step itself (0.01).
    TICK_SIZE = 4


#: Exchanges whose ccxt definitions count digits rather than give steps: the
#: bundled Binance file (older ccxt) and Bitfinex and Bithumb in current ccxt.
_COUNTING_MODES: dict[str, PrecisionMode] = {
    "BINANCE": PrecisionMode.DECIMAL_PLACES,
    "BITFINEX": PrecisionMode.SIGNIFICANT_DIGITS,
    "BITHUMB": PrecisionMode.SIGNIFICANT_DIGITS,
}

_TYPES = {"spot": "FX", "swap": "PERP", "future": "FUT", "option": "OPT"}
_OPTION_TYPES = {"call": "C", "put": "P"}
_OPTION_NAMES = {"C": "Call", "P": "Put"}
_KIND = {"FX": "FX pair", "PERP": "Perpetual swap", "FUT": "Future", "OPT": "Option"}
_EXCHANGE_CODES = frozenset(code for _, code in EXCHANGES)

#: Significant-digit prices: Bitfinex allows at most 8 decimals, which bounds the
#: finest tick; above the top the tick stays that of the last decade.
_MAX_DECIMALS = 8
_TOP_DECADE = 9

#: A price range of a tick rule: (from, to, tick), None for an open end.
TickRange = tuple[Decimal | None, Decimal | None, Decimal]


class _Unmappable(Exception):
    """The market cannot become a product; the message says why."""


def detect_precision_mode(exchange_code: str, markets: Mapping[str, Any]) -> PrecisionMode:
    """The precision layout of ``markets`` when the caller does not know it.

    A fractional value anywhere proves steps (neither counting layout has one).
    Otherwise every value is a whole number, which fits steps of 1, 10, ... as
    well as digit counts, so the exchange decides: the ones in ``_COUNTING_MODES``
    count, the others give steps.
    """
    for market in markets.values():
        precision = market.get("precision") if isinstance(market, dict) else None
        if not isinstance(precision, dict):
            continue
        for key in ("amount", "price"):
            try:
                value = to_decimal(precision.get(key))
            except ValueError:
                continue
            if value != value.to_integral_value():
                return PrecisionMode.TICK_SIZE
    return _COUNTING_MODES.get(exchange_code, PrecisionMode.TICK_SIZE)


def products_from_ccxt(
    exchange_code: str,
    markets: Mapping[str, Any],
    precision_mode: PrecisionMode | None = None,
) -> list[ProductSpec]:
    """The products of one exchange's ccxt markets, sorted by Caspian code.

    ``precision_mode`` defaults to :func:`detect_precision_mode`. The result
    depends only on the markets, not on their order.
    """
    if exchange_code not in _EXCHANGE_CODES:
        raise ValueError(f"unknown exchange code {exchange_code!r}")
    mode = (
        precision_mode
        if precision_mode is not None
        else detect_precision_mode(exchange_code, markets)
    )
    candidates: list[tuple[tuple[int, str], ProductSpec]] = []
    for key in sorted(markets):
        market = markets[key]
        if isinstance(market, dict) and market.get("active") is False:
            continue
        try:
            product = _product(exchange_code, key, market, mode)
        except _Unmappable as exc:
            log.debug("%s: skipping ccxt market %s: %s", exchange_code, key, exc)
            continue
        candidates.append((_preference(market, product), product))
    candidates.sort(key=lambda item: (item[1].caspian_code, item[0]))
    kept: dict[str, ProductSpec] = {}
    pseudo_codes: set[str] = set()
    for _, product in candidates:
        if product.caspian_code in kept or product.pseudo_code in pseudo_codes:
            continue
        kept[product.caspian_code] = product
        pseudo_codes.add(product.pseudo_code)
    return [_with_underlying(product, kept) for product in kept.values()]


def _with_underlying(product: ProductSpec, codes: Container[str]) -> ProductSpec:
    if product.type == "FX":
        return product
    pair = f"{product.ccy_from}/{product.ccy_to}={product.exchange}"
    candidates = [f"FX-{pair}"] + ([f"PERP-{pair}"] if product.type != "PERP" else [])
    underlying = next((code for code in candidates if code in codes), None)
    return replace(product, underlying_caspian_code=underlying)


def repair_underlyings(products: Iterable[ProductSpec]) -> list[ProductSpec]:
    """The products whose ``underlyingCaspianCode`` names none of ``products``, with the
    underlying the rule gives among them instead.

    For catalogs made before the rule (they named the spot pair whether listed or
    not), and for expired products a refresh keeps after their pair was retired.
    """
    every = list(products)
    codes = {product.caspian_code for product in every}
    return [
        _with_underlying(product, codes)
        for product in every
        if product.underlying_caspian_code is not None
        and product.underlying_caspian_code not in codes
    ]


def _preference(market: dict[str, Any], product: ProductSpec) -> tuple[int, str]:
    settle = market.get("settle")
    settle = normalize_currency(settle) if isinstance(settle, str) else None
    rank = 0 if settle == product.ccy_from else 1 if settle == product.ccy_to else 2
    return rank, product.native_code_v2


def _product(exchange: str, key: str, market: Any, mode: PrecisionMode) -> ProductSpec:
    if not isinstance(market, dict):
        raise _Unmappable("not a market object")
    product_type = _TYPES.get(str(market.get("type")))
    if product_type is None:
        raise _Unmappable(f"market type {market.get('type')!r} has no product type")
    base = _text(market, "base")
    quote = _text(market, "quote")
    symbol = market.get("symbol") or key

    expiry_ms: int | None = None
    expiry: date | None = None
    strike: Decimal | None = None
    option_type: str | None = None
    if product_type in ("FUT", "OPT"):
        expiry_ms, expiry = _expiry(market)
    if product_type == "OPT":
        strike = _number(market, "strike")
        option_type = _OPTION_TYPES.get(str(market.get("optionType")))
        if option_type is None:
            raise _Unmappable(f"optionType {market.get('optionType')!r} is not call or put")
    try:
        parts = SymbolParts(
            product_type,
            normalize_currency(base),
            normalize_currency(quote),
            exchange,
            expiry,
            strike,
            option_type,
        )
    except ValueError as exc:
        raise _Unmappable(str(exc)) from None

    precision = market.get("precision")
    if not isinstance(precision, dict):
        raise _Unmappable("no precision")
    lot = _step(precision.get("amount"), mode, "amount")
    ranges = _tick_ranges(market, precision.get("price"), mode)

    derivative = product_type != "FX"
    multiplier: str | None = None
    if derivative and market.get("contractSize") not in (None, ""):
        multiplier = plain_decimal(_number(market, "contractSize"))
    expire_date = format_us(expiry_ms * 1000) if expiry_ms is not None else None
    return ProductSpec(
        exchange=exchange,
        type=product_type,
        caspian_code=parts.caspian_code,
        pseudo_code=parts.pseudo_code,
        tora_code=parts.tora_code,
        tora_market=parts.tora_market,
        native_code=_native_code(exchange, market),
        native_code_v2=str(symbol),
        ccy_from=parts.base,
        ccy_to=parts.quote,
        description=_description(parts),
        lot_size=plain_decimal(lot),
        tick_size=plain_decimal(min(tick for _, _, tick in ranges)),
        tick_rule=format_tick_rule(ranges),
        multiplier=multiplier,
        expire_date=expire_date,
        last_trading_date=expire_date,
        strike=plain_decimal(strike) if strike is not None else None,
    )


def _native_code(exchange: str, market: dict[str, Any]) -> str:
    if exchange == "COINONE":
        # ccxt's Coinone id is the id of the ticker it read the market from, a new
        # number on every load; Coinone itself names a KRW market by its currency.
        return _text(market, "baseId").lower()
    return _text(market, "id")


def _description(parts: SymbolParts) -> str:
    kind = _KIND[parts.type]
    if parts.expiry is not None:
        kind = f"{kind} {format_expiry(parts.expiry)}"
    if parts.strike is not None and parts.option_type is not None:
        kind = f"{kind} {plain_decimal(parts.strike)} {_OPTION_NAMES[parts.option_type]}"
    return f"{currency_name(parts.base)} - {currency_name(parts.quote)} - {kind}"


def format_tick_rule(ranges: list[TickRange]) -> str:
    """``from,to,tick`` per range, joined by ``;`` (see the module docstring)."""
    return ";".join(
        ",".join(plain_decimal(value) if value is not None else "" for value in one)
        for one in ranges
    )


def parse_tick_rule(rule: str) -> list[TickRange]:
    """The ranges of a ``tickRule`` string, the inverse of :func:`format_tick_rule`."""
    ranges: list[TickRange] = []
    for part in rule.split(";"):
        try:
            low, high, tick = part.split(",")
            ranges.append(
                (
                    to_decimal(low) if low else None,
                    to_decimal(high) if high else None,
                    to_decimal(tick),
                )
            )
        except ValueError:
            raise ValueError(f"malformed tick rule {rule!r}") from None
    return ranges


def _tick_ranges(market: dict[str, Any], price: Any, mode: PrecisionMode) -> list[TickRange]:
    if mode is PrecisionMode.SIGNIFICANT_DIGITS:
        return _significant_ranges(_digits(price, "price"))
    tick = _step(price, mode, "price")
    info = market.get("info")
    steps = info.get("tick_size_steps") if isinstance(info, dict) else None
    if not steps:
        return [(None, None, tick)]
    if not isinstance(steps, list):
        raise _Unmappable("tick_size_steps is not a list")
    try:
        bounds = sorted(
            (to_decimal(step["above_price"]), to_decimal(step["tick_size"])) for step in steps
        )
    except (ValueError, KeyError, TypeError):
        raise _Unmappable(f"malformed tick_size_steps {steps!r}") from None
    ranges: list[TickRange] = []
    low: Decimal | None = None
    for above, step_tick in bounds:
        if step_tick <= 0 or (low is not None and above <= low) or above <= 0:
            raise _Unmappable(f"malformed tick_size_steps {steps!r}")
        ranges.append((low, above, tick))
        low, tick = above, step_tick
    ranges.append((low, None, tick))
    return ranges


def _significant_ranges(digits: int) -> list[TickRange]:
    """One range per decade: in [10**k, 10**(k+1)) the tick is 10**(k+1-digits)."""
    if not 1 <= digits <= _MAX_DECIMALS + _TOP_DECADE:
        raise _Unmappable(f"price keeps {digits} significant digits")
    finest = Decimal(1).scaleb(-_MAX_DECIMALS)
    # Below 10**first the tick would be under the finest allowed.
    first = digits - _MAX_DECIMALS
    ranges: list[TickRange] = [(None, Decimal(1).scaleb(first), finest)]
    for decade in range(first, _TOP_DECADE + 1):
        low = Decimal(1).scaleb(decade)
        high = Decimal(1).scaleb(decade + 1) if decade < _TOP_DECADE else None
        ranges.append((low, high, Decimal(1).scaleb(decade + 1 - digits)))
    return ranges


def _step(value: Any, mode: PrecisionMode, what: str) -> Decimal:
    if mode is PrecisionMode.TICK_SIZE:
        try:
            step = to_decimal(value)
        except ValueError:
            raise _Unmappable(f"no {what} step") from None
        if step <= 0:
            raise _Unmappable(f"{what} step {value!r} is not positive")
        return step
    return Decimal(1).scaleb(-_digits(value, what))


def _digits(value: Any, what: str) -> int:
    try:
        count = to_decimal(value)
    except ValueError:
        raise _Unmappable(f"no {what} precision") from None
    if count != count.to_integral_value():
        raise _Unmappable(f"{what} precision {value!r} is not a count of digits")
    return int(count)


def _expiry(market: dict[str, Any]) -> tuple[int, date]:
    """The expiry in ms since the epoch, and its GMT date."""
    expiry = _number(market, "expiry")
    if expiry != expiry.to_integral_value() or expiry <= 0:
        raise _Unmappable(f"expiry {market.get('expiry')!r} is not a time in ms")
    try:
        return int(expiry), us_to_dt(int(expiry) * 1000).date()
    except (OverflowError, ValueError):
        raise _Unmappable(f"expiry {market.get('expiry')!r} is out of range") from None


def _number(market: dict[str, Any], key: str) -> Decimal:
    try:
        return to_decimal(market.get(key))
    except ValueError:
        raise _Unmappable(f"{key} {market.get(key)!r} is not a number") from None


def _text(market: dict[str, Any], key: str) -> str:
    value = market.get(key)
    if not isinstance(value, str) or not value:
        raise _Unmappable(f"no {key}")
    return value
