"""The README's exchange table is the registry's: one row per record, in its words.

Its last column says how each exchange is tested, from the tests themselves:
every streamed exchange must have a local mock in ``tests/test_live.py``'s
venues, run through the tests every venue gets.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from caspian.sources.live import EXCHANGES, Exchange
from tests.test_live import VENUES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def how_tested(exchange: Exchange) -> str:
    if not exchange.live:
        return "replay only"
    venue = next(venue for venue in VENUES if venue.code == exchange.code)
    mock = Path(inspect.getsourcefile(venue.mock) or "").relative_to(ROOT)
    names = {exchange.code.lower(), exchange.client or ""}
    if exchange.adapter is not None:
        names.add(exchange.adapter.ccxt_id)
    own = sorted(
        f"`{path.relative_to(ROOT)}`"
        for path in (ROOT / "tests").glob("test_*.py")
        if names & set(path.stem.split("_")[1:])
    )
    broken = (
        "a crossed book"
        if venue.breakage == "cross"
        else f"a lost message, caught by the {venue.reason} check"
    )
    return (
        f"a local mock (`{mock}`) in `tests/test_live.py`: book, every change, trades, "
        f"a dropped connection, a silent one, {broken}"
        + (f"; also {', '.join(own)}" if own else "")
    )


def row(exchange: Exchange) -> str:
    if exchange.adapter is not None:
        reached = f"ccxt.pro (`{exchange.adapter.ccxt_id}`)"
    elif exchange.client is not None:
        reached = f"Caspian's own client (`caspian.sources.live.{exchange.client}`)"
    else:
        reached = "not streamed"
    checks = "; ".join(exchange.checks) or "none"
    notes = exchange.notes.replace("|", "\\|")
    cells = (exchange.code, exchange.name, reached, checks, how_tested(exchange), notes)
    return "| " + " | ".join(cells) + " |"


def table() -> str:
    head = [
        "| code | exchange | reached through | book checks | tested with | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join([*head, *(row(exchange) for exchange in EXCHANGES)])


def test_the_readme_lists_every_exchange_as_the_registry_does() -> None:
    assert table() in README.read_text(), (
        "README.md's exchange table differs from the registry; the table is:\n" + table()
    )
