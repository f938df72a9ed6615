"""The three codes of a product (Caspian, Pseudo, Tora), built from its parts and parsed back.

The formats are the contract's (``shared/spec/CONTRACT.md`` section 2), by type:

- FX: ``FX-ETH/USD=GEMINI``, Pseudo ``ETHUSD=GEMINI``, Tora ``ETH/USD.GEMINI``
- FUT: ``FUT-BTC/JPY-2018JUN30=BITFLYER``, Pseudo ``BTCJPY180630=BITFLYER``,
  Tora ``BTC/JPY-20180630.BITFLYER``
- PERP: ``PERP-BTC/USD=BITMEX``, Pseudo ``BTCUSDPERP=BITMEX``, Tora ``BTC/USD-PERP.BITMEX``
- OPT: ``OPT-BTC/USD-2019MAR29-4000-C=DERIBIT``, Pseudo ``BTCUSD190329C4000=DERIBIT``,
  Tora ``BTC/USD-20190329-4000-C.DERIBIT``

A Tora symbol is ``toraCode.toraMarket``; the market is the exchange code.
Only Caspian codes are parsed: a Pseudo code runs base and quote together
(``ETHUSD``), so it cannot be split without knowing the product.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation

from caspian.catalog.product import PRODUCT_TYPES

MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
#: Call or put, as the codes write them.
OPTION_TYPES = ("C", "P")

# Currencies and exchanges are restricted to upper-case letters and digits because
# "-", "/", "=" and "." separate the parts of the codes.
_NAME = re.compile(r"[A-Z0-9]+")
_CASPIAN = re.compile(
    r"(?P<type>[A-Z]+)-(?P<base>[A-Z0-9]+)/(?P<quote>[A-Z0-9]+)"
    r"(?:-(?P<date>\d{4}[A-Z]{3}\d{2}))?"
    r"(?:-(?P<strike>\d+(?:\.\d+)?)-(?P<option_type>[A-Z]))?"
    r"=(?P<exchange>[A-Z0-9]+)"
)


def to_decimal(value: object) -> Decimal:
    """A finite decimal from an int, float, string or Decimal; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, float):
        # Through str, so 0.1 stays 0.1 rather than the float's binary expansion.
        value = str(value)
    if not isinstance(value, int | str | Decimal):
        raise ValueError(f"not a number: {value!r}")
    try:
        result = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r}") from None
    if not result.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    return result


def plain_decimal(value: Decimal) -> str:
    """Shortest plain form, never an exponent: ``4000``, ``0.5``, ``0.000001``."""
    return format(value.normalize(), "f")


def format_expiry(day: date) -> str:
    """An expiry as Caspian codes write it: ``2018JUN30``."""
    return f"{day.year:04d}{MONTHS[day.month - 1]}{day.day:02d}"


def _parse_date(text: str) -> date:
    month = text[4:7]
    if month not in MONTHS:
        raise ValueError(f"unknown month {month!r} in {text!r}")
    try:
        return date(int(text[:4]), MONTHS.index(month) + 1, int(text[7:]))
    except ValueError:
        raise ValueError(f"no such date {text!r}") from None


@dataclass(frozen=True, slots=True)
class SymbolParts:
    """What a product's codes are made of; construction checks the parts fit its type.

    ``expiry`` is required for FUT and OPT, ``strike`` (positive) and
    ``option_type`` (``"C"`` or ``"P"``) for OPT only; FX and PERP take none of them.
    """

    type: str
    base: str
    quote: str
    exchange: str
    expiry: date | None = None
    strike: Decimal | None = None
    option_type: str | None = None

    def __post_init__(self) -> None:
        if self.type not in PRODUCT_TYPES:
            raise ValueError(f"unknown product type {self.type!r}; expected one of {PRODUCT_TYPES}")
        for label, value in (
            ("base", self.base),
            ("quote", self.quote),
            ("exchange", self.exchange),
        ):
            if not _NAME.fullmatch(value):
                raise ValueError(f"{label} {value!r} must be upper-case letters and digits")
        dated = self.type in ("FUT", "OPT")
        if (self.expiry is not None) != dated:
            raise ValueError(f"a {self.type} product {'needs' if dated else 'has no'} expiry")
        is_option = self.type == "OPT"
        if (self.strike is not None) != is_option or (self.option_type is not None) != is_option:
            raise ValueError(
                f"a {self.type} product {'needs' if is_option else 'has no'} strike and call/put"
            )
        if self.strike is not None and not (self.strike.is_finite() and self.strike > 0):
            raise ValueError(f"strike must be a positive number, not {self.strike}")
        if self.option_type is not None and self.option_type not in OPTION_TYPES:
            raise ValueError(f"call/put must be C or P, not {self.option_type!r}")

    def _strike_text(self) -> str:
        assert self.strike is not None
        return plain_decimal(self.strike)

    @property
    def caspian_code(self) -> str:
        pair = f"{self.base}/{self.quote}"
        if self.type in ("FX", "PERP"):
            return f"{self.type}-{pair}={self.exchange}"
        assert self.expiry is not None
        dated = f"{self.type}-{pair}-{format_expiry(self.expiry)}"
        if self.type == "FUT":
            return f"{dated}={self.exchange}"
        return f"{dated}-{self._strike_text()}-{self.option_type}={self.exchange}"

    @property
    def pseudo_code(self) -> str:
        pair = f"{self.base}{self.quote}"
        if self.type == "FX":
            return f"{pair}={self.exchange}"
        if self.type == "PERP":
            return f"{pair}PERP={self.exchange}"
        assert self.expiry is not None
        dated = f"{pair}{self.expiry:%y%m%d}"
        if self.type == "FUT":
            return f"{dated}={self.exchange}"
        return f"{dated}{self.option_type}{self._strike_text()}={self.exchange}"

    @property
    def tora_code(self) -> str:
        pair = f"{self.base}/{self.quote}"
        if self.type == "FX":
            return pair
        if self.type == "PERP":
            return f"{pair}-PERP"
        assert self.expiry is not None
        dated = f"{pair}-{self.expiry:%Y%m%d}"
        if self.type == "FUT":
            return dated
        return f"{dated}-{self._strike_text()}-{self.option_type}"

    @property
    def tora_market(self) -> str:
        return self.exchange

    @property
    def tora_symbol(self) -> str:
        """The Tora code as a subscription names it: ``toraCode.toraMarket``."""
        return tora_symbol(self.tora_code, self.tora_market)


def tora_symbol(tora_code: str, tora_market: str) -> str:
    return f"{tora_code}.{tora_market}"


def parse_caspian_code(code: str) -> SymbolParts:
    """The parts of a Caspian code; ValueError names what is wrong with a malformed one.

    Only the canonical spelling is accepted (``4000``, not ``4000.0``), so that
    every product has exactly one Caspian code.
    """
    match = _CASPIAN.fullmatch(code)
    if match is None:
        raise ValueError(
            f"malformed Caspian code {code!r}: expected TYPE-BASE/QUOTE[-YYYYMONDD"
            "[-STRIKE-C|P]]=EXCHANGE, e.g. FX-ETH/USD=GEMINI or FUT-BTC/JPY-2018JUN30=BITFLYER"
        )
    date_text, strike_text = match["date"], match["strike"]
    try:
        parts = SymbolParts(
            type=match["type"],
            base=match["base"],
            quote=match["quote"],
            exchange=match["exchange"],
            expiry=_parse_date(date_text) if date_text is not None else None,
            strike=Decimal(strike_text) if strike_text is not None else None,
            option_type=match["option_type"],
        )
    except ValueError as exc:
        raise ValueError(f"malformed Caspian code {code!r}: {exc}") from None
    if parts.caspian_code != code:
        raise ValueError(
            f"malformed Caspian code {code!r}: not in canonical form {parts.caspian_code!r}"
        )
    return parts
