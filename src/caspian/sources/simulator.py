"""The built-in market simulator: live-looking books and trades for any product.

It is the default source of ``caspian serve``, so a laptop without network
access still streams something that behaves like a market::

    sim = Simulator(lookup, seed=7, rate=20.0)
    task = asyncio.create_task(sim.run(sink))
    sim.watch("FX-BTC/USD=GEMINI")

:class:`SymbolSimulator` is the pure, synchronous core for one symbol (no
clock, no I/O: it is given each tick's time), :class:`Simulator` the single
asyncio task that ticks every watched symbol. What a symbol emits for a given
sequence of tick times depends only on the seed and the symbol, so runs can be
reproduced and tests can compare them.

Prices are kept as integer numbers of ticks and sizes as integer numbers of
lots, so every price is on the product's tick grid and every size on its lot
grid, without float drift, however long the simulation runs. Under a tick rule
of several ranges (Deribit's options: 0.0001 below 0.005, 0.0005 above) the
grid is one tick valid over the whole band the price may wander in, and the
price stays inside that band. Prices are in the product's own price currency:
an option settled in its base currency is priced in it (a Deribit BTC option
at 0.0345 BTC, not at dollars).

A dated product is simulated until it expires, judged by the simulator's
clock: then its streams go ``disconnected`` for good and it is dropped; so is
a product retired from the catalog (:meth:`Simulator.close_market`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from caspian.catalog.ccxt_markets import TickRange
from caspian.codes import Stream, StreamState
from caspian.events import BookEvent, Event, Level, StatusEvent, TradeEvent, every_stream
from caspian.sources.base import EventSink, Source
from caspian.timefmt import now_us

log = logging.getLogger(__name__)

#: Approximate USD value of one unit of each currency, for plausible starting
#: prices; a currency missing here is worth 1.0.
USD_VALUES: dict[str, float] = {
    "BTC": 60_000.0,
    "XBT": 60_000.0,
    "ETH": 3_000.0,
    "LTC": 80.0,
    "XRP": 0.55,
    "BCH": 400.0,
    "EOS": 0.7,
    "ADA": 0.45,
    "DOT": 6.5,
    "SOL": 150.0,
    "DOGE": 0.12,
    "TRX": 0.12,
    "LINK": 14.0,
    "BNB": 550.0,
    "SUSHI": 1.0,
    "XLM": 0.1,
    "XMR": 150.0,
    "ETC": 25.0,
    "ZEC": 30.0,
    "DASH": 28.0,
    "NEO": 12.0,
    "XTZ": 0.9,
    "ATOM": 8.0,
    "AVAX": 30.0,
    "UNI": 8.0,
    "MATIC": 0.6,
    "USDT": 1.0,
    "USDC": 1.0,
    "DAI": 1.0,
    "BUSD": 1.0,
    "TUSD": 1.0,
    "USD": 1.0,
    "EUR": 1.08,
    "GBP": 1.27,
    "JPY": 0.0067,
    "KRW": 0.00073,
    "SGD": 0.74,
    "CAD": 0.73,
    "AUD": 0.66,
    "NZD": 0.6,
    "CHF": 1.12,
    "TRY": 0.031,
    "CNY": 0.14,
    "HKD": 0.128,
    "INR": 0.012,
    "BRL": 0.19,
    "MXN": 0.055,
    "ZAR": 0.054,
    "PLN": 0.25,
    "RUB": 0.011,
}

#: Levels per side: the book is refilled at its far edge when it falls under
#: the minimum and trimmed when it grows over the maximum, both back to the
#: target, so the far edge changes in occasional batches rather than every tick.
DEPTH_MIN = 120
DEPTH_TARGET = 135
DEPTH_MAX = 150
#: How many levels from the best count as "near the top", where most order
#: activity happens.
_TOP = 10
#: Mean distance between neighbouring levels, relative to the price: with a
#: tick far smaller than the price, levels one tick apart would make a book of
#: 100+ levels span almost nothing.
_LEVEL_SPACING = 0.5e-4
#: Standard deviation of the log mid per tick, calm and during a burst, and
#: the chances per tick of entering and leaving a burst.
_CALM_VOL = 3e-5
_BURST_VOL = 1.5e-4
_TO_BURST = 0.002
_TO_CALM = 0.02
#: Options move with leverage on their underlying.
_OPTION_VOL_FACTOR = 3.0
#: A weak pull of the log mid towards its start, so a service left running for
#: days keeps prices near the catalog's plausible values.
_REVERSION = 1e-6
#: Mean time between outages of one symbol (any stream) at default rates.
OUTAGE_MEAN_INTERVAL_S = 300.0
#: Length of an outage, in ticks.
_OUTAGE_TICKS = (5, 40)
_STREAMS = (Stream.BBO, Stream.TRADE, Stream.DEPTH)
#: Under a tick rule, the start price's range is kept as the band only when its
#: top leaves the price this much room to move up; else the next, coarser, one.
_BAND_ROOM = 1.5


@dataclass(frozen=True, slots=True)
class SimProduct:
    """What the simulator needs to know of a product."""

    symbol: str
    ccy_from: str
    ccy_to: str
    kind: str  # "FX" | "FUT" | "PERP" | "OPT"
    tick: float
    lot: float
    strike: float | None = None
    call: bool | None = None
    #: The currency prices are in when it is not ``ccy_to`` (an option's premium).
    price_ccy: str | None = None
    #: The ranges of the tick rule; empty: ``tick`` everywhere.
    tick_rule: tuple[TickRange, ...] = ()
    #: When a dated product stops trading, in µs since the epoch.
    expires_us: int | None = None


def usd_value(currency: str) -> float:
    return USD_VALUES.get(currency.upper(), 1.0)


def _decimals(step: float) -> int:
    """Decimal places of a grid step, to print grid values without float noise."""
    exponent = Decimal(repr(step)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def option_value(spot: float, strike: float, call: bool, years: float, vol: float) -> float:
    """Black-Scholes value without rates: intrinsic value plus time value."""
    root = vol * math.sqrt(years)
    d1 = (math.log(spot / strike) + 0.5 * root * root) / root
    d2 = d1 - root
    if call:
        return spot * _normal_cdf(d1) - strike * _normal_cdf(d2)
    return strike * _normal_cdf(-d2) - spot * _normal_cdf(-d1)


def start_price(product: SimProduct, rng: random.Random) -> float:
    """A plausible price in the product's price currency, slightly different per symbol."""
    spot = usd_value(product.ccy_from) / usd_value(product.ccy_to)
    # Venues never agree exactly; a small offset makes the same pair on two
    # exchanges look like two markets.
    spot *= 1.0 + rng.uniform(-0.001, 0.001)
    if product.kind == "FUT":
        return spot * (1.0 + rng.uniform(0.002, 0.02))
    if product.kind == "PERP":
        return spot * (1.0 + rng.uniform(-0.0005, 0.0005))
    if product.kind == "OPT":
        strike = product.strike if product.strike is not None and product.strike > 0 else spot
        call = product.call is not False
        intrinsic = max(0.0, spot - strike) if call else max(0.0, strike - spot)
        value = option_value(spot, strike, call, rng.uniform(7, 120) / 365, rng.uniform(0.5, 0.9))
        # Far out of the money Black-Scholes is ~0, but a listed option never
        # trades for nothing.
        premium = max(value, intrinsic) + spot * 0.0005
        if product.price_ccy is not None and product.price_ccy == product.ccy_from:
            # Premium paid in the base: quote per contract over quote per base.
            return premium / spot
        return premium
    return spot


@dataclass(frozen=True, slots=True)
class _Layout:
    """The grid of one symbol's book and where its mid may go, in ticks of that grid."""

    tick: float
    mid: float
    gap_lo: int
    gap_hi: int
    half_spread: float
    #: Lowest bid and highest ask allowed (None: no bound above).
    lowest: int
    highest: int | None
    log_floor: float
    log_ceiling: float | None


def _layout(tick: float, price: float, low: Decimal | None, high: Decimal | None) -> _Layout | None:
    """The book's layout on a ``tick`` grid, prices in [low, high); None if it does not fit."""
    mid = price / tick
    spacing = max(1, round(mid * _LEVEL_SPACING))
    gap_lo = max(1, spacing // 2)
    gap_hi = spacing + spacing // 2
    # The deepest side spans at most this many ticks from the mid.
    span = (DEPTH_MAX + 2.0) * gap_hi + 2.0
    # Decimal: a bound on the grid (0.005 / 0.0001) must give its exact count of ticks.
    grid = Decimal(repr(tick))
    lowest = max(1, math.ceil(low / grid)) if low is not None else 1
    # A floor under the mid leaves room for a full bid side at allowed prices
    # even when the tick is coarse relative to the price.
    floor = lowest + span
    start = max(mid, 1.1 * floor)
    highest: int | None = None
    ceiling: float | None = None
    if high is not None:
        highest = math.ceil(high / grid) - 1
        ceiling = highest - span
        if ceiling < start * _BAND_ROOM:
            return None
    return _Layout(
        tick=tick,
        mid=start,
        gap_lo=gap_lo,
        gap_hi=gap_hi,
        half_spread=max(0.5, spacing / 2),
        lowest=lowest,
        highest=highest,
        log_floor=math.log(floor),
        log_ceiling=math.log(ceiling) if ceiling is not None else None,
    )


def choose_layout(product: SimProduct, price: float) -> _Layout:
    """The finest grid the tick rule allows around ``price``, with room for the price to move.

    A grid is valid where it is a multiple of the rule's tick; the band is the
    run of ranges around the start price where it is. The start price's own
    range is tried first, then coarser ones above it, until one leaves the
    price room (:data:`_BAND_ROOM`) or no bound is left.
    """
    rule = product.tick_rule
    if not rule:
        found = _layout(product.tick, price, None, None)
        assert found is not None
        return found
    start = next(
        (i for i, (low, high, _) in enumerate(rule) if high is None or price < float(high)),
        len(rule) - 1,
    )
    for index in range(start, len(rule)):
        grid = rule[index][2]
        valid = [grid % tick == 0 for _, _, tick in rule]
        low = next((rule[i][1] for i in range(index - 1, -1, -1) if not valid[i]), None)
        high = next((rule[i][0] for i in range(index + 1, len(rule)) if not valid[i]), None)
        found = _layout(float(grid), price, low, high)
        if found is not None:
            return found
    raise ValueError(f"{product.symbol}: no tick of its rule leaves room for a book")


class _Side:
    """One side of the book, keyed so that the best level has the largest key.

    A key is the price in ticks for bids and minus it for asks, which lets one
    piece of code serve both sides.
    """

    __slots__ = ("born", "changed", "keys", "lots", "sign")

    def __init__(self, sign: int) -> None:
        self.sign = sign
        self.keys: list[int] = []  # ascending: the best level is last
        self.lots: dict[int, int] = {}
        self.changed: dict[int, int] = {}  # new lots (0: removed) since the last diff
        # Levels added since the last diff: removing one again before the diff
        # must not show clients the removal of a level they never saw.
        self.born: set[int] = set()

    def put(self, index: int, key: int, lots: int) -> None:
        self.keys.insert(index, key)
        self.lots[key] = lots
        if key not in self.changed:
            self.born.add(key)
        self.changed[key] = lots

    def resize(self, key: int, lots: int) -> None:
        self.lots[key] = lots
        self.changed[key] = lots

    def remove(self, index: int) -> None:
        self.forget(self.keys.pop(index))

    def forget(self, key: int) -> None:
        """Drop a level already taken out of :attr:`keys`."""
        del self.lots[key]
        if key in self.born:
            self.born.remove(key)
            del self.changed[key]
        else:
            self.changed[key] = 0

    def reported(self) -> None:
        self.changed.clear()
        self.born.clear()


class SymbolSimulator:
    """The market of one symbol, advanced one tick per :meth:`step`.

    Each tick: streams may go down or come back (with ``outage_probability``
    per stream and tick), trades take liquidity from the best levels, the mid
    takes a random-walk step whose volatility switches between calm and burst
    regimes, both sides follow the mid (levels left on the wrong side removed,
    new ones added at the top and at the far edge) and orders near the top
    change. The book is never crossed: bids stay at or under
    ``mid - half_spread`` and asks at or over ``mid + half_spread``.
    """

    def __init__(self, product: SimProduct, seed: int, outage_probability: float = 0.0) -> None:
        if not (math.isfinite(product.tick) and product.tick > 0):
            raise ValueError(f"{product.symbol}: tick must be positive, not {product.tick}")
        if not (math.isfinite(product.lot) and product.lot > 0):
            raise ValueError(f"{product.symbol}: lot must be positive, not {product.lot}")
        self.product = product
        self._symbol = product.symbol
        self._rng = rng = random.Random(zlib.crc32(f"{seed}:{product.symbol}".encode()))
        self._outage_probability = outage_probability
        layout = choose_layout(product, start_price(product, rng))
        self._tick = layout.tick
        self._lot = product.lot
        self._tick_decimals = _decimals(layout.tick)
        self._lot_decimals = _decimals(product.lot)
        self._gap_lo = layout.gap_lo
        self._gap_hi = layout.gap_hi
        self._half_spread = layout.half_spread
        self._lowest = layout.lowest
        self._highest = layout.highest
        self._log_floor = layout.log_floor
        self._log_ceiling = layout.log_ceiling
        self._log_mid = self._log_anchor = math.log(layout.mid)
        self._calm_vol = _CALM_VOL * rng.uniform(0.7, 1.4)
        if product.kind == "OPT":
            self._calm_vol *= _OPTION_VOL_FACTOR
        self._burst = False
        self._trend = 0
        self._typical_lots = max(
            3.0, rng.uniform(2_000, 20_000) / usd_value(product.ccy_from) / product.lot
        )
        self._latency = rng.randint(1_000, 30_000)
        self._trade_id = 0
        self._down: dict[Stream, int] = {}
        self._resync = False
        self._bids = _Side(1)
        self._asks = _Side(-1)
        self._follow_mid()

    @property
    def symbol(self) -> str:
        return self._symbol

    @property
    def mid(self) -> float:
        """The simulated fair price, in the quote currency."""
        return math.exp(self._log_mid) * self._tick

    def start(self, ts: int) -> list[Event]:
        """Every stream connected, then the whole book."""
        self._down.clear()
        self._resync = False
        events: list[Event] = [
            StatusEvent(self._symbol, ts, stream, StreamState.CONNECTED) for stream in _STREAMS
        ]
        events.append(self._snapshot(ts, self._exchange_ts(ts)))
        return events

    def step(self, ts: int) -> list[Event]:
        """The events of one tick: status changes, trades, then one book diff or snapshot."""
        rng = self._rng
        events: list[Event] = []
        if self._outage_probability > 0:
            self._outages(ts, events)
        exchange_ts = self._exchange_ts(ts)
        if self._burst:
            self._burst = rng.random() >= _TO_CALM
        else:
            self._burst = rng.random() < _TO_BURST
        pressure = self._trade(ts, exchange_ts, events)
        self._walk(pressure)
        self._follow_mid()
        churn = 1 + int(rng.random() * (4 if self._burst else 2))
        for side in (self._bids, self._asks):
            self._churn(side, churn)
            self._refill(side)
            self._keep_depth(side)
        if Stream.DEPTH in self._down:
            self._bids.reported()
            self._asks.reported()
        elif self._resync:
            self._resync = False
            events.append(self._snapshot(ts, exchange_ts))
        else:
            events.append(self._diff(ts, exchange_ts))
        return events

    def _exchange_ts(self, ts: int) -> int:
        return ts - self._latency - self._rng.randrange(2_000)

    def _outages(self, ts: int, events: list[Event]) -> None:
        rng = self._rng
        for stream in _STREAMS:
            left = self._down.get(stream)
            if left is None:
                if rng.random() < self._outage_probability:
                    self._down[stream] = rng.randint(*_OUTAGE_TICKS)
                    events.append(StatusEvent(self._symbol, ts, stream, StreamState.DISCONNECTED))
            elif left > 1:
                self._down[stream] = left - 1
            else:
                del self._down[stream]
                events.append(StatusEvent(self._symbol, ts, stream, StreamState.CONNECTED))
                # The book went on changing unseen: only a whole one is right now.
                self._resync = self._resync or stream is Stream.DEPTH

    def _trade(self, ts: int, exchange_ts: int, events: list[Event]) -> int:
        """Market orders against the best levels; returns buys minus sells."""
        rng = self._rng
        if rng.random() >= (0.6 if self._burst else 0.25):
            return 0
        count = 1 + (rng.random() < 0.3) + (self._burst and rng.random() < 0.4)
        buy_chance = 0.5 + 0.2 * self._trend
        report = Stream.TRADE not in self._down
        pressure = 0
        for _ in range(count):
            buy = rng.random() < buy_chance
            side = self._asks if buy else self._bids
            key = side.keys[-1]
            available = side.lots[key]
            if rng.random() < 0.15:
                lots = available
            else:
                wanted = round(self._typical_lots * rng.lognormvariate(-1.0, 1.0))
                lots = min(available, max(1, wanted))
            if lots == available:
                side.remove(len(side.keys) - 1)
            else:
                side.resize(key, available - lots)
            pressure += 1 if buy else -1
            if report:
                self._trade_id += 1
                events.append(
                    TradeEvent(
                        self._symbol,
                        ts,
                        self._price(side.sign * key),
                        self._size(lots),
                        str(self._trade_id),
                        {"side": "BUY" if buy else "SELL"},
                        exchange_ts,
                    )
                )
        return pressure

    def _walk(self, pressure: int) -> None:
        vol = self._calm_vol * (_BURST_VOL / _CALM_VOL if self._burst else 1.0)
        move = (
            vol * self._rng.gauss(0.0, 1.0)
            + 0.3 * vol * pressure
            - _REVERSION * (self._log_mid - self._log_anchor)
        )
        self._log_mid += move
        if self._log_mid < self._log_floor:
            self._log_mid = 2.0 * self._log_floor - self._log_mid
        elif self._log_ceiling is not None and self._log_mid > self._log_ceiling:
            self._log_mid = 2.0 * self._log_ceiling - self._log_mid
        self._trend = (move > 0) - (move < 0)

    def _follow_mid(self) -> None:
        mid = math.exp(self._log_mid)
        self._follow(self._bids, math.floor(mid - self._half_spread))
        self._follow(self._asks, -math.ceil(mid + self._half_spread))

    def _follow(self, side: _Side, limit: int) -> None:
        """Move one side under ``limit``, the largest key the mid now allows it."""
        keys = side.keys
        while keys and keys[-1] > limit:
            side.remove(len(keys) - 1)
        top = keys[-1] if keys else None
        key = limit - self._rng.randint(0, self._gap_lo - 1)
        fresh: list[int] = []
        while (
            (top is None or key - top >= self._gap_lo)
            and len(fresh) < DEPTH_TARGET
            and self._allowed(side, key)
        ):
            fresh.append(key)
            key -= self._gap()
        for key in reversed(fresh):
            side.put(len(keys), key, self._new_lots(1.0))
        self._keep_depth(side)

    def _churn(self, side: _Side, count: int) -> None:
        """Orders added, resized and cancelled, mostly near the top."""
        rng = self._rng
        keys = side.keys
        for _ in range(count):
            index = len(keys) - 1 - int(rng.random() ** 2 * min(_TOP, len(keys)))
            key = keys[index]
            roll = rng.random()
            if roll < 0.6:
                self._resize(side, key)
            elif roll < 0.8:
                side.remove(index)
            elif index > 0 and key - keys[index - 1] > 1:
                side.put(index, rng.randint(keys[index - 1] + 1, key - 1), self._new_lots(1.0))
        if rng.random() < 0.2:
            self._resize(side, keys[rng.randrange(len(keys))])

    def _refill(self, side: _Side) -> None:
        """Fill one hole near the top, as liquidity returns where it was taken or cancelled.

        Without it holes only ever grow there: cancels and trades remove levels
        anywhere, while following the mid adds them only above the best.
        """
        keys = side.keys
        for index in range(len(keys) - 1, max(0, len(keys) - 1 - _TOP), -1):
            if keys[index] - keys[index - 1] > self._gap_hi:
                side.put(index, keys[index] - self._gap(), self._new_lots(1.0))
                return

    def _resize(self, side: _Side, key: int) -> None:
        old = side.lots[key]
        new = max(1, round(old * self._rng.lognormvariate(0.0, 0.4)))
        side.resize(key, new if new != old else old + 1)

    def _keep_depth(self, side: _Side) -> None:
        keys = side.keys
        if len(keys) < DEPTH_MIN:
            key = keys[0] - self._gap()
            # Near the floor or the ceiling the far edge may run out of allowed
            # prices before the side is full.
            while len(keys) < DEPTH_TARGET and self._allowed(side, key):
                side.put(0, key, self._new_lots(1.5))
                key -= self._gap()
        elif len(keys) > DEPTH_MAX:
            extra = len(keys) - DEPTH_TARGET
            for key in keys[:extra]:
                side.forget(key)
            del keys[:extra]

    def _allowed(self, side: _Side, key: int) -> bool:
        """Whether a new level at ``key`` would be at a price the band allows."""
        if side.sign > 0:
            return key >= self._lowest
        return self._highest is None or -key <= self._highest

    def _gap(self) -> int:
        return self._rng.randint(self._gap_lo, self._gap_hi)

    def _new_lots(self, scale: float) -> int:
        return max(1, round(self._typical_lots * scale * self._rng.lognormvariate(0.0, 0.9)))

    def _price(self, ticks: int) -> float:
        return round(ticks * self._tick, self._tick_decimals)

    def _size(self, lots: int) -> float:
        return round(lots * self._lot, self._lot_decimals)

    def _levels(self, side: _Side, items: list[tuple[int, int]]) -> list[Level]:
        sign = side.sign
        return [(self._price(sign * key), self._size(lots)) for key, lots in items]

    def _snapshot(self, ts: int, exchange_ts: int) -> BookEvent:
        bids, asks = self._bids, self._asks
        bids.reported()
        asks.reported()
        return BookEvent(
            self._symbol,
            ts,
            True,
            self._levels(bids, [(key, bids.lots[key]) for key in reversed(bids.keys)]),
            self._levels(asks, [(key, asks.lots[key]) for key in reversed(asks.keys)]),
            exchange_ts,
        )

    def _diff(self, ts: int, exchange_ts: int) -> BookEvent:
        bids, asks = self._bids, self._asks
        event = BookEvent(
            self._symbol,
            ts,
            False,
            self._levels(bids, sorted(bids.changed.items(), reverse=True)),
            self._levels(asks, sorted(asks.changed.items(), reverse=True)),
            exchange_ts,
        )
        bids.reported()
        asks.reported()
        return event


#: Watched symbols are spread over this many phases of each tick, so their
#: events do not all fire in one burst.
_PHASES = 4
#: Loop time one tick may take before it lets the loop run: the clients of the
#: symbols stepped so far get their updates flushed, and nothing else waits
#: behind a long phase (a client subscribing to many symbols makes phases long).
_TURN_S = 0.0002


class Simulator(Source):
    """Ticks every watched symbol ``rate`` times a second, from one task.

    ``lookup`` turns a symbol into its :class:`SimProduct` (None: not a
    product, and the symbol is ignored). With ``outages``, each stream of a
    symbol now and then goes down for a few ticks; ``outage_probability`` is
    the chance per stream and tick, by default one outage per symbol every
    :data:`OUTAGE_MEAN_INTERVAL_S` seconds on average. ``clock`` gives the time
    in µs since the epoch: event times, and whether a dated product has expired.
    """

    def __init__(
        self,
        lookup: Callable[[str], SimProduct | None],
        seed: int = 1,
        rate: float = 20.0,
        outages: bool = False,
        outage_probability: float | None = None,
        clock: Callable[[], int] = now_us,
    ) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be positive, not {rate}")
        if outage_probability is not None and not 0.0 <= outage_probability <= 1.0:
            raise ValueError(f"outage_probability must be in [0, 1], not {outage_probability}")
        self._lookup = lookup
        self._clock = clock
        self._seed = seed
        self._rate = rate
        if not outages:
            self._outage_probability = 0.0
        elif outage_probability is None:
            self._outage_probability = 1.0 / (rate * OUTAGE_MEAN_INTERVAL_S * len(_STREAMS))
        else:
            self._outage_probability = outage_probability
        self._symbols: dict[str, SymbolSimulator] = {}
        self._pending: dict[str, SymbolSimulator] = {}
        #: Set while running: a symbol watched then starts at once.
        self._sink: EventSink | None = None
        self._phases: list[dict[str, SymbolSimulator]] = [{} for _ in range(_PHASES)]
        self._waiter: asyncio.Future[None] | None = None

    @property
    def watched(self) -> frozenset[str]:
        return frozenset(self._symbols)

    def watch(self, symbol: str) -> None:
        if symbol in self._symbols:
            return
        product = self._lookup(symbol)
        if product is None:
            return
        if _expired(product, self._clock()):
            log.info("not simulating %s: it has expired", symbol)
            return
        try:
            sim = SymbolSimulator(product, self._seed, self._outage_probability)
        except ValueError:
            log.warning("not simulating %s: its product is not usable", symbol, exc_info=True)
            return
        self._symbols[symbol] = sim
        if self._sink is not None:
            # Started at once, so that a new subscriber's first message already
            # holds the symbol's state: it says connected, as nothing is down.
            self._start(symbol, sim, self._clock(), self._sink)
        else:
            self._pending[symbol] = sim
        _release(self._waiter)

    def unwatch(self, symbol: str) -> None:
        if self._symbols.pop(symbol, None) is None:
            return
        self._pending.pop(symbol, None)
        self._phases[zlib.crc32(symbol.encode()) % _PHASES].pop(symbol, None)

    async def run(self, sink: EventSink) -> None:
        self._sink = sink
        loop = asyncio.get_running_loop()
        interval = 1.0 / (self._rate * _PHASES)
        due = loop.time()
        phase = 0
        while True:
            if self._pending:
                self._start_pending(sink)
            now = loop.time()
            if now >= due:
                await self._tick(self._phases[phase], sink)
                phase = (phase + 1) % _PHASES
                due += interval
                now = loop.time()
                if due <= now:
                    # Overloaded: drop the missed ticks instead of running them
                    # back to back, which would only fall further behind.
                    due += math.ceil((now - due) / interval) * interval
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiter = waiter
            timer: asyncio.Handle | None = None
            if self._pending:
                timer = loop.call_soon(_release, waiter)
            elif self._symbols:
                timer = loop.call_at(due, _release, waiter)
            # With nothing watched there is no timer at all: watch() wakes us.
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None

    def _start_pending(self, sink: EventSink) -> None:
        ts = self._clock()
        pending, self._pending = self._pending, {}
        for symbol, sim in pending.items():
            if self._symbols.get(symbol) is sim:
                self._start(symbol, sim, ts, sink)

    def _start(self, symbol: str, sim: SymbolSimulator, ts: int, sink: EventSink) -> None:
        self._phases[zlib.crc32(symbol.encode()) % _PHASES][symbol] = sim
        _deliver(sim.start(ts), sink)

    async def _tick(self, phase: dict[str, SymbolSimulator], sink: EventSink) -> None:
        ts = self._clock()
        turn_ends = time.perf_counter() + _TURN_S
        for symbol, sim in list(phase.items()):
            if time.perf_counter() >= turn_ends:
                await asyncio.sleep(0)
                ts = self._clock()
                turn_ends = time.perf_counter() + _TURN_S
            # The sink, or others while we yielded, may unwatch symbols of this phase.
            if self._symbols.get(symbol) is not sim:
                continue
            if _expired(sim.product, ts):
                log.info("%s has expired: no longer simulated", symbol)
                self._close(symbol, ts, sink)
            else:
                _deliver(sim.step(ts), sink)

    def close_market(self, symbol: str) -> None:
        """The product is gone (delisted): its streams go down for good, as at expiry."""
        if symbol in self._symbols and self._sink is not None:
            log.info("%s was retired from the catalog: no longer simulated", symbol)
            self._close(symbol, self._clock(), self._sink)

    def _close(self, symbol: str, ts: int, sink: EventSink) -> None:
        """The market closed: its streams go down for good and it is no longer ticked."""
        self.unwatch(symbol)
        _deliver(
            every_stream(symbol, ts, StreamState.DISCONNECTED),
            sink,
        )


def _expired(product: SimProduct, ts: int) -> bool:
    return product.expires_us is not None and ts >= product.expires_us


def _release(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _deliver(events: list[Event], sink: EventSink) -> None:
    for event in events:
        try:
            sink(event)
        except Exception:
            # One consumer's bug must not stop the market for every symbol.
            log.exception("event sink failed on %r", event)
