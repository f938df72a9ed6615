"""The built-in reference data: products of all 22 exchanges, from the package's data files.

- ``data/ccxt/<ccxt id>.json``: ccxt's market fixtures, unchanged (see ``data/ccxt/SOURCE.md``).
- ``data/ccxt_patches.json``: per file and ccxt symbol, market fields that replace the
  fixture's where it lacks them (expiries, steps) or states them in other units (BitMEX).
- ``data/extra_markets.json``: hand-written markets, in ccxt's format, of the exchanges
  ccxt no longer has (BTCC, ItBit, Korbit, Liquid).
"""

from __future__ import annotations

import json
import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from caspian.catalog.ccxt_markets import products_from_ccxt
from caspian.catalog.exchanges import CCXT_FILES, EXCHANGES
from caspian.catalog.product import ProductSpec


def load_ccxt_file(path: str | os.PathLike[str] | Traversable) -> dict[str, Any]:
    """A ccxt markets object (ccxt symbol -> market) from a JSON file."""
    source = Path(path) if isinstance(path, str | os.PathLike) else path
    try:
        markets = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not JSON: {exc}") from None
    if not isinstance(markets, dict):
        raise ValueError(f"{source} is not a ccxt markets object (symbol -> market)")
    return markets


def _patched(markets: dict[str, Any], patches: dict[str, Any]) -> dict[str, Any]:
    """``markets`` with each patch's fields replacing those of the market it names."""
    unknown = sorted(set(patches) - set(markets))
    if unknown:
        # A patch that matches nothing means the fixture changed under it.
        raise ValueError(f"patches for markets not in the file: {unknown}")
    return {symbol: market | patches.get(symbol, {}) for symbol, market in markets.items()}


def builtin_markets() -> dict[str, dict[str, Any]]:
    """Exchange code -> its ccxt markets object, patched, for every exchange."""
    data = files("caspian.catalog") / "data"
    patches = load_ccxt_file(data / "ccxt_patches.json")
    extras = load_ccxt_file(data / "extra_markets.json")
    result: dict[str, dict[str, Any]] = {}
    for _, code in EXCHANGES:
        ccxt_id = CCXT_FILES.get(code)
        if ccxt_id is None:
            if code not in extras:
                raise ValueError(f"extra_markets.json has no markets for {code}")
            result[code] = extras[code]
        else:
            markets = load_ccxt_file(data / "ccxt" / f"{ccxt_id}.json")
            result[code] = _patched(markets, patches.get(ccxt_id, {}))
    return result


def builtin_products() -> list[ProductSpec]:
    """Every built-in product, exchange by exchange in the contract's order."""
    return [
        product
        for code, markets in builtin_markets().items()
        for product in products_from_ccxt(code, markets)
    ]
