"""What every selection strategy shares: the pool, the context, the selection, the base class and helpers.

Contract of :meth:`Strategy.select` (enforced here, so each strategy only implements ``_select``):

- ``budget`` must be an integer ≥ 1 (``ValueError`` otherwise); ``seed`` an integer.
- Empty pool → empty selection.
- ``budget ≥ len(pool)`` → every item is taken, in pool order, without running the strategy (there is
  nothing to choose); each reason says so.
- Otherwise exactly ``budget`` distinct indices come back, in the strategy's priority order (first = most
  wanted), with one human-readable reason per index.
- Deterministic given ``seed``: every random draw uses ``numpy.random.default_rng(seed)`` and every
  scikit-learn estimator ``random_state=seed``. Ties in a ranking are broken by pool index (stable sort).
- Scores follow oodguard's convention: higher = more OOD. NaN scores rank last.
"""

from __future__ import annotations

import abc
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class Pool:
    """The unlabeled pool: N queued items as arrays.

    ids: ``[N]`` str — queue record ids (stable; what goes to the labeling tool).
    features: ``[N, D]`` float32 — penultimate features ``h``.
    logits: ``[N, K]`` or ``[N, K+1]`` float32 — the served model's logits (K+1 when it has an
        "unknown" output, see :attr:`Context.unknown_label`).
    scores: name → ``[N]`` float64 — every OOD score the fused head computed (higher = more OOD).

    Arrays are converted (and checked) on construction. An empty pool may be built with
    ``Pool.empty()`` or from empty arrays.
    """

    ids: np.ndarray
    features: np.ndarray
    logits: np.ndarray
    scores: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        ids = np.asarray(self.ids)
        ids = ids.astype(str) if ids.size else np.empty(0, dtype=str)
        features = np.asarray(self.features, dtype=np.float32)
        logits = np.asarray(self.logits, dtype=np.float32)
        n = len(ids)
        if n == 0:
            features = features.reshape(0, features.shape[-1] if features.ndim == 2 else 0)
            logits = logits.reshape(0, logits.shape[-1] if logits.ndim == 2 else 0)
        if ids.ndim != 1:
            raise ValueError(f"Pool.ids must be 1-D, got shape {ids.shape}")
        if features.ndim != 2 or features.shape[0] != n:
            raise ValueError(f"Pool.features must be [N={n}, D], got shape {features.shape}")
        if logits.ndim != 2 or logits.shape[0] != n:
            raise ValueError(f"Pool.logits must be [N={n}, K], got shape {logits.shape}")
        scores = {}
        for name, values in dict(self.scores).items():
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            if values.shape != (n,):
                raise ValueError(f"Pool.scores[{name!r}] must have shape ({n},), got {values.shape}")
            scores[str(name)] = values
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "logits", logits)
        object.__setattr__(self, "scores", scores)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, dim: int = 0, num_outputs: int = 0) -> "Pool":
        return cls(np.empty(0, dtype=str), np.zeros((0, dim), np.float32), np.zeros((0, num_outputs), np.float32), {})

    @classmethod
    def from_records(cls, records: Iterable[Any]) -> "Pool":
        """Build a pool from queue records (anything with ``id``, ``features``, ``logits``, ``scores``,
        e.g. :class:`oodguard.queues.base.QueueRecord`). A score missing from some records is NaN there
        (NaN ranks last in every strategy)."""
        records = list(records)
        if not records:
            return cls.empty()
        names = sorted({name for record in records for name in record.scores})
        return cls(
            ids=np.array([str(record.id) for record in records]),
            features=np.stack([np.asarray(record.features, np.float32).reshape(-1) for record in records]),
            logits=np.stack([np.asarray(record.logits, np.float32).reshape(-1) for record in records]),
            scores={name: np.array([record.scores.get(name, np.nan) for record in records], np.float64)
                    for name in names},
        )

    def subset(self, indices: np.ndarray) -> "Pool":
        indices = np.asarray(indices, dtype=np.int64)
        return Pool(self.ids[indices], self.features[indices], self.logits[indices],
                    {name: values[indices] for name, values in self.scores.items()})


@dataclass
class Context:
    """What a strategy may know besides the pool.

    labeled_features / labeled_labels: ``[M, D]`` / ``[M]`` — the already-labeled known-class set, features
        at the pool's version and known-class indices (coreset uses its features as initial centres; the
        (K+1)-way detector of lfosa, jsosal and open-quota trains on them).
    unknown_features: ``[U, D]`` — features of the labeled records the annotators marked unknown ("not
        relevant", or a new class the model does not have): the detector's (K+1)-th class.
    known_classes: K, the number of known classes; None = infer from the logits (their width, minus one
        when ``unknown_label`` is set).
    unknown_label: index of the "unknown" output among the K+1 logits when the model has one, else None.
    id_scores: OOD scores of held-out labeled ID data, name → ``[M']`` (ALOE's threshold).
    params: strategy parameters (each strategy's docstring lists the ones it reads).
    """

    labeled_features: np.ndarray | None = None
    labeled_labels: np.ndarray | None = None
    unknown_features: np.ndarray | None = None
    known_classes: int | None = None
    unknown_label: int | None = None
    id_scores: Mapping[str, np.ndarray] | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Selection:
    """The chosen pool indices (priority order) and why each was chosen (``reasons[i]`` ↔ ``indices[i]``)."""

    indices: np.ndarray
    reasons: list[str]

    def __post_init__(self):
        object.__setattr__(self, "indices", np.asarray(self.indices, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "reasons", list(self.reasons))
        if len(self.reasons) != len(self.indices):
            raise ValueError(f"{len(self.indices)} indices but {len(self.reasons)} reasons")

    def __len__(self) -> int:
        return len(self.indices)

    def ids(self, pool: Pool) -> np.ndarray:
        return pool.ids[self.indices]


class Strategy(abc.ABC):
    """A selection strategy. Subclasses set ``name`` and implement :meth:`_select`, which is only called
    with a non-empty pool and ``1 ≤ budget < len(pool)`` and must return exactly ``budget`` distinct
    indices (checked)."""

    name: ClassVar[str] = ""
    #: the parameters (``Context.params`` keys) the strategy reads, each with what it does and its default
    params: ClassVar[dict[str, str]] = {}

    @classmethod
    def describe_params(cls) -> str:
        return ", ".join(f"{k} ({v})" for k, v in cls.params.items()) or "none"

    @classmethod
    def check_params(cls, params: dict) -> None:
        """:class:`ValueError` naming every key of ``params`` the strategy does not read (a misspelt parameter
        would otherwise be ignored silently), with the ones it does."""
        unknown = sorted(set(params) - set(cls.params))
        if unknown:
            raise ValueError(f"strategy {cls.name!r} has no parameter(s) {unknown}; its parameters: "
                             f"{cls.describe_params()}")

    def select(self, pool: Pool, budget: int, seed: int = 0, context: Context | None = None) -> Selection:
        if not isinstance(pool, Pool):
            raise TypeError(f"pool must be an oodguard.harvest.Pool, got {type(pool).__name__}")
        if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
            raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        budget, seed = int(budget), int(seed)
        context = Context() if context is None else context
        self.check_params(context.params)
        n = len(pool)
        if n == 0:
            return Selection(np.empty(0, dtype=np.int64), [])
        if budget >= n:
            return Selection(np.arange(n), [f"{self.name}: budget {budget} >= pool size {n}, every item taken"] * n)
        selection = self._select(pool, budget, seed, context)
        indices = selection.indices
        if (len(indices) != budget or len(np.unique(indices)) != budget
                or (budget and (indices.min() < 0 or indices.max() >= n))):
            raise RuntimeError(f"strategy {self.name!r} returned an invalid selection "
                               f"({len(indices)} indices, {len(np.unique(indices))} distinct, budget {budget}, N {n})")
        return selection

    @abc.abstractmethod
    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection: ...


# ---------------------------------------------------------------- helpers shared by the strategies


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first; ties by index; NaN last."""
    values = np.where(np.isnan(values), -np.inf, np.asarray(values, dtype=np.float64))
    return np.argsort(-values, kind="stable")[:k]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def param_value(text: str) -> int | float | str:
    """A strategy parameter given as text (``--param KEY=VALUE``, a benchmark's ``name:KEY=VALUE``): an int, a
    float, or else the text itself."""
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return text


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 softmax probability per row (``[N]``); 1 for a single output (no second class)."""
    p = softmax(logits)
    if p.shape[1] < 2:
        return np.ones(len(p))
    two = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return two[:, 1] - two[:, 0]


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats, row-wise (0·log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * np.log(probs), 0.0)
    return -terms.sum(axis=1)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def known_logits(pool: Pool, context: Context) -> tuple[np.ndarray, np.ndarray, int]:
    """(logits over the known classes ``[N, K]``, mask of items predicted "unknown" ``[N]``, K).

    With ``context.unknown_label`` set the model has K+1 outputs and that column is removed; an item is
    predicted unknown when that output is its argmax. Without it, all outputs are known classes."""
    logits = pool.logits
    width = logits.shape[1]
    if context.unknown_label is None:
        k = width
        predicted_unknown = np.zeros(len(pool), dtype=bool)
        known = logits
    else:
        u = int(context.unknown_label)
        if not 0 <= u < width:
            raise ValueError(f"context.unknown_label={u} is outside the {width} logits")
        k = width - 1
        predicted_unknown = logits.argmax(axis=1) == u
        known = np.delete(logits, u, axis=1)
    if context.known_classes is not None and int(context.known_classes) != k:
        raise ValueError(f"context.known_classes={context.known_classes} but the pool's logits have {width} "
                         f"outputs (unknown_label={context.unknown_label}), i.e. {k} known classes")
    return known, predicted_unknown, k


def num_known(pool: Pool, context: Context) -> int:
    if context.known_classes is not None:
        return int(context.known_classes)
    return pool.logits.shape[1] - (0 if context.unknown_label is None else 1)


def require_score(pool: Pool, name: str, strategy: str) -> np.ndarray:
    if name not in pool.scores:
        raise ValueError(f"strategy {strategy!r} needs score {name!r}, but the pool has "
                         f"{sorted(pool.scores) or 'no scores'}; pass context.params['score'] to pick another")
    return pool.scores[name]


def subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """All of ``range(n)`` when ``n <= limit``, else ``limit`` indices drawn without replacement (sorted)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


#: default of the ``max_pool`` param of the strategies whose cost grows with the pool (badge, coreset)
MAX_POOL = 20_000


def pool_subsample(n: int, budget: int, context: "Context", rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Indices of at most ``max(params["max_pool"], budget)`` of a pool of ``n`` (all when it is smaller), and
    the note that says so in the selection reasons ("" when nothing was left out)."""
    kept = subsample(n, max(int(context.params.get("max_pool", MAX_POOL)), budget), rng)
    return kept, ("" if len(kept) == n else f"; pool subsampled to {len(kept)} of {n}")
