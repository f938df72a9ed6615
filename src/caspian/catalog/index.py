"""The catalog in memory: products found by any of their three codes in one dict lookup."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from caspian.catalog.product import ProductSpec
from caspian.catalog.symbols import tora_symbol
from caspian.codes import SymbolType


class Catalog:
    """Products by Caspian code, Pseudo code and Tora symbol (``toraCode.toraMarket``).

    Should two products share a code, the first given keeps it: the store never
    holds two with one Caspian code, but products imported apart could in principle
    share a Pseudo code, and a lookup must not depend on which was imported last.
    """

    def __init__(self, products: Iterable[ProductSpec]) -> None:
        self._by_caspian: dict[str, ProductSpec] = {}
        self._by_pseudo: dict[str, ProductSpec] = {}
        self._by_tora: dict[str, ProductSpec] = {}
        for product in products:
            self._by_caspian.setdefault(product.caspian_code, product)
            self._by_pseudo.setdefault(product.pseudo_code, product)
            self._by_tora.setdefault(tora_symbol(product.tora_code, product.tora_market), product)
        self._by_type: dict[str, dict[str, ProductSpec]] = {
            SymbolType.CASPIAN: self._by_caspian,
            SymbolType.PSEUDO: self._by_pseudo,
            SymbolType.TORA: self._by_tora,
        }

    def get(self, caspian_code: str) -> ProductSpec | None:
        return self._by_caspian.get(caspian_code)

    def resolve(self, symbol: str, symbol_type: str) -> ProductSpec | None:
        """The product ``symbol`` names; ``symbol_type`` is ``Caspian``, ``Pseudo`` or ``Tora``."""
        try:
            index = self._by_type[symbol_type]
        except KeyError:
            raise ValueError(f"unknown symbol type {symbol_type!r}") from None
        return index.get(symbol)

    def __len__(self) -> int:
        return len(self._by_caspian)

    def __iter__(self) -> Iterator[ProductSpec]:
        return iter(self._by_caspian.values())
