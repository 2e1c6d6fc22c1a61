"""Harvest: choose which queued items go to labeling.

A harvest reads records from the active-learning queue (:mod:`oodguard.queues.base`), turns them into a
:class:`Pool` of arrays (ids, features, logits, scores) and asks a selection strategy for ``budget`` of
them. Strategies see arrays only, never the storage, and all share one signature::

    select(pool, budget, seed, context) -> Selection(indices, reasons)

This package runs next to the queue: it imports numpy (and, lazily inside the strategies that need it,
scikit-learn), never torch.

Example::

    from oodguard.harvest import Context, Pool, get_strategy

    pool = Pool.from_records(queue.select(flagged=None))
    selection = get_strategy("aloe").select(pool, budget=100, seed=0, context=Context(known_classes=10))
    ids = pool.ids[selection.indices]
"""

from .strategies import STRATEGIES, get_strategy, select
from .strategies.base import Context, Pool, Selection, Strategy

__all__ = ["Context", "Pool", "STRATEGIES", "Selection", "Strategy", "get_strategy", "select"]
