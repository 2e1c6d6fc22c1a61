"""The selection strategies, one module each, behind one registry.

``STRATEGIES`` maps a strategy's name to its class; ``get_strategy(name)`` returns an instance; all share
``select(pool, budget, seed, context) -> Selection``. Adding a strategy = one module + one line here +
its test (``tests/harvest/test_<module>.py``); the registry test runs the shared contract over every entry.
"""

from __future__ import annotations

from .aloe import AloeStrategy
from .badge import BadgeStrategy
from .base import Context, Pool, Selection, Strategy
from .coreset import CoresetStrategy
from .entropy import EntropyStrategy
from .jsosal import JsosalStrategy
from .least_confidence import LeastConfidenceStrategy
from .lfosa import LfosaStrategy
from .margin import MarginStrategy
from .open_quota import OpenQuotaStrategy
from .random_sampling import RandomStrategy
from .sisom import SisomStrategy
from .sisom_diverse import SisomDiverseStrategy

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (
    RandomStrategy,
    EntropyStrategy,
    MarginStrategy,
    LeastConfidenceStrategy,
    CoresetStrategy,
    BadgeStrategy,
    SisomStrategy,
    SisomDiverseStrategy,
    AloeStrategy,
    LfosaStrategy,
    JsosalStrategy,
    OpenQuotaStrategy,
)}


def get_strategy(name: str) -> Strategy:
    """A new instance of the strategy registered as ``name``."""
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()


def select(name: str, pool: Pool, budget: int, seed: int = 0, context: Context | None = None) -> Selection:
    """Shorthand for ``get_strategy(name).select(pool, budget, seed, context)``."""
    return get_strategy(name).select(pool, budget, seed, context)


__all__ = ["STRATEGIES", "Context", "Pool", "Selection", "Strategy", "get_strategy", "select"]
