"""badge: k-means++ seeding on gradient embeddings (Ash et al. 2020, BADGE).

The gradient embedding of item i is ``g_i = (p_i − e_{ĉ_i}) ⊗ h_i`` (softmax over all outputs, ĉ the
argmax, h the penultimate features, unnormalised). It is never materialised as ``[N, K·D]``: the kernel
identity ``<g_i, g_j> = <u_i, u_j>·<h_i, h_j>`` with ``u = p − e_ĉ`` gives
``||g_i − g_j||² = ||u_i||²||h_i||² + ||u_j||²||h_j||² − 2<u_i, u_j><h_i, h_j>`` at O(K + D) per pair.

As in BADGE's reference code the first centre is the largest-norm embedding; each next one is drawn with
probability ∝ D² (squared distance to the nearest chosen centre) from ``default_rng(seed)``; chosen items
have D² = 0 (if every remaining D² is 0 the draw is uniform over the unchosen).

params ``max_pool`` (default 20000): the pool is subsampled (seeded) to at most ``max(max_pool, B)``
items, O(B·N·(K+D)) after that; the reasons say so.
"""

from __future__ import annotations

import numpy as np

from .base import Context, Pool, Selection, Strategy, pool_subsample, softmax


def embedding_parts(logits: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u = p − e_ĉ ``[N, K]``, h ``[N, D]``, ||g||² ``[N]``) in float64: the factors of ``g = u ⊗ h``."""
    u = softmax(logits)
    u[np.arange(len(u)), u.argmax(axis=1)] -= 1.0
    h = np.asarray(features, dtype=np.float64)
    return u, h, (u * u).sum(axis=1) * (h * h).sum(axis=1)


def sq_distances_to(u: np.ndarray, h: np.ndarray, g2: np.ndarray, j: int) -> np.ndarray:
    """||g_i − g_j||² for every i, from the kernel identity, clipped at 0."""
    return np.maximum(g2 + g2[j] - 2.0 * (u @ u[j]) * (h @ h[j]), 0.0)


class BadgeStrategy(Strategy):
    name = "badge"
    params = {"max_pool": "pool subsample size (default 20000)"}

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        rng = np.random.default_rng(seed)
        sub, note = pool_subsample(len(pool), budget, context, rng)
        u, h, g2 = embedding_parts(pool.logits[sub], pool.features[sub])

        def sq_distance(j: int) -> np.ndarray:
            return sq_distances_to(u, h, g2, j)

        chosen = np.empty(budget, dtype=np.int64)
        reasons = []
        first = int(np.argmax(g2))
        chosen[0] = first
        reasons.append(f"badge: first centre, largest gradient-embedding norm {np.sqrt(g2[first]):.3f}{note}")
        d2 = sq_distance(first)
        d2[first] = 0.0
        for step in range(1, budget):
            total = d2.sum()
            if total > 0:
                pick = int(rng.choice(len(sub), p=d2 / total))
            else:
                free = np.setdiff1d(np.arange(len(sub)), chosen[:step])
                pick = int(rng.choice(free))
            chosen[step] = pick
            reasons.append(f"badge: k-means++ centre {step + 1}, squared distance {d2[pick]:.3f} to the nearest "
                           f"chosen gradient embedding (drawn ∝ D², mean D² {total / max(len(sub) - step, 1):.3f}){note}")
            np.minimum(d2, sq_distance(pick), out=d2)
            d2[chosen[:step + 1]] = 0.0
        return Selection(sub[chosen], reasons)
