"""Where ``caspian products import`` gets ccxt market definitions: a file, or ccxt live."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from caspian.catalog.exchanges import CCXT_FILES, CCXT_IDS, EXCHANGES
from caspian.sources.live.source import merged

_CODES = {code for _, code in EXCHANGES}
# Old ids too, so that a file named after one (huobi.json) still says its exchange.
_BY_CCXT_ID = {ccxt_id: code for ids in (CCXT_FILES, CCXT_IDS) for code, ccxt_id in ids.items()}


def resolve_exchange(given: str | None, fallback: str | None) -> str:
    """A Caspian exchange code from a code (``GDAX``) or a ccxt id (``coinbaseexchange``)."""
    for candidate in (given, fallback):
        if not candidate:
            continue
        if candidate.upper() in _CODES:
            return candidate.upper()
        if candidate.lower() in _BY_CCXT_ID:
            return _BY_CCXT_ID[candidate.lower()]
        if candidate is given:
            raise ValueError(f"unknown exchange {candidate!r}")
    raise ValueError("name the exchange with --exchange CODE")


def markets_from_file(path: Path) -> dict[str, Any]:
    try:
        # Bytes rather than text: json detects UTF-8, -16 and -32 by itself.
        markets = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(markets, dict):
        raise ValueError(f"{path} is not a ccxt markets object (symbol -> market)")
    return markets


async def fetch_ccxt_markets(
    code: str, urls: Mapping[str, Any] | None = None, api_url: str | None = None
) -> dict[str, Any]:
    """The exchange's markets through ccxt.

    ``urls`` is merged into ccxt's ``urls`` of the exchange, in the layout of
    ``CASPIAN_LIVE_URLS`` (CONTRACT.md section 7); ``api_url`` sends every API of
    the table to that one base address instead (a mirror, or a recording served
    locally).
    """
    import ccxt.async_support as ccxt_async

    ccxt_id = CCXT_IDS.get(code)
    if ccxt_id is None:
        raise ValueError(f"ccxt does not support {code}")
    exchange_class = getattr(ccxt_async, ccxt_id, None)
    if exchange_class is None:
        raise ValueError(f"the installed ccxt has no exchange {ccxt_id!r} for {code}")
    exchange = exchange_class({"enableRateLimit": False, "timeout": 15_000})
    if urls is not None:
        exchange.urls = merged(exchange.urls, urls)
    if api_url is not None:
        table = exchange.urls["api"]
        base = api_url.rstrip("/")
        exchange.urls["api"] = {name: base for name in table} if isinstance(table, dict) else base
    try:
        markets = await exchange.load_markets()
    except Exception as exc:
        raise ValueError(f"could not load {code} markets through ccxt: {exc}") from None
    finally:
        await exchange.close()
    return dict(markets)
