"""The 22 exchanges of the Caspian API as the catalog sees them, derived from the registry.

The records live in :mod:`caspian.sources.live.registry`; these are the views
the catalog, the store and the REST API read.
"""

from __future__ import annotations

from caspian.sources.live.registry import EXCHANGES as _RECORDS

#: (name, code) of every supported exchange, in the contract's order.
EXCHANGES: tuple[tuple[str, str], ...] = tuple((e.name, e.code) for e in _RECORDS)

#: Caspian exchange code -> the name of its bundled ccxt markets file (the ccxt
#: id when the file was made). BTCC, ItBit, Korbit and Liquid have none: ccxt
#: dropped them, so their products are hand-written.
CCXT_FILES: dict[str, str] = {e.code: e.markets_file for e in _RECORDS if e.markets_file}

#: Caspian exchange code -> exchange id in the ccxt this project installs, for
#: fetching markets and streaming live.
CCXT_IDS: dict[str, str] = {e.code: e.ccxt_id for e in _RECORDS if e.ccxt_id}
