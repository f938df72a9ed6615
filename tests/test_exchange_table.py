"""The README's exchange table is the registry's: one row per record, in its words."""

from __future__ import annotations

from pathlib import Path

from caspian.sources.live import EXCHANGES, Exchange

README = Path(__file__).resolve().parent.parent / "README.md"


def row(exchange: Exchange) -> str:
    if exchange.adapter is not None:
        reached = f"ccxt.pro (`{exchange.adapter.ccxt_id}`)"
    elif exchange.client is not None:
        reached = f"Caspian's own client (`caspian.sources.live.{exchange.client}`)"
    else:
        reached = "not streamed"
    checks = "; ".join(exchange.checks) or "none"
    notes = exchange.notes.replace("|", "\\|")
    return f"| {exchange.code} | {exchange.name} | {reached} | {checks} | {notes} |"


def table() -> str:
    head = [
        "| code | exchange | reached through | book checks | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    return "\n".join([*head, *(row(exchange) for exchange in EXCHANGES)])


def test_the_readme_lists_every_exchange_as_the_registry_does() -> None:
    assert table() in README.read_text(), (
        "README.md's exchange table differs from the registry; the table is:\n" + table()
    )
