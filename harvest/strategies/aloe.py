"""aloe: ALOE (Xie, Zhang, Bai, Nowak, "Deep Active Learning in the Open World", TMLR 2025).

1. OOD score o(x) = pool score params ``score``: ``"gradnorm"`` (default; the published paper's) or
   ``"energy"`` (the score of the paper's early version, −logsumexp of the logits), or any other pool
   score (oodguard stores every score as higher = more OOD). Threshold λ = the params ``tpr`` (default 0.95) quantile of
   ``context.id_scores[score]`` (held-out labeled ID data: 95% TPR). Without ID scores λ falls back to the
   params ``pool_quantile`` (default 0.5) quantile of the pool's own scores — a weaker, relative
   threshold; every reason then says so. flag(x) = o(x) > λ.
2. k-means on the L2-normalised features with M = min(2·max(B, K), N) clusters, ``random_state=seed``:
   - small problems (N·M ≤ params ``kmeans_max_work``, default 5e6): scikit-learn ``KMeans`` (greedy
     k-means++, ``n_init`` = params ``n_init``, default 3);
   - larger ones: ``MiniBatchKMeans`` (batch 4096, stops after 5 mini-batches without improvement),
     initialised by plain k-means++ (``n_local_trials=1``) on a seeded subsample of max(3·M, 4096) items —
     scikit-learn's greedy k-means++ (≈ 2 + ln M trials per centre) dominates the cost there for about the
     same final inertia (measurements: docs/benchmarks.md#aloe-k-means-initialisation).
3. Clusters ranked by OOD ratio = flagged share (ties: mean score, then cluster id); the top B clusters.
4. From each, the member with the highest score. If fewer than B clusters are non-empty, the remaining
   slots are filled with the highest-scoring items not yet taken.
"""

from __future__ import annotations

import warnings

import numpy as np

from .base import Context, Pool, Selection, Strategy, l2_normalise, num_known, require_score


def cluster(x: np.ndarray, clusters: int, seed: int, params: dict) -> np.ndarray:
    """Cluster labels of ``x`` (see the module docstring for the two paths)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans, kmeans_plusplus

    x = np.asarray(x, dtype=np.float64)  # scikit-learn's float32 distance path upcasts chunk by chunk: slower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer distinct points than clusters" on duplicated pools
        if len(x) * clusters <= float(params.get("kmeans_max_work", 5e6)):
            model = KMeans(n_clusters=clusters, n_init=int(params.get("n_init", 3)), random_state=seed)
            return model.fit_predict(x)
        rng = np.random.default_rng(seed)
        init_rows = x[np.sort(rng.choice(len(x), size=min(len(x), max(3 * clusters, 4096)), replace=False))]
        centres, _ = kmeans_plusplus(init_rows, clusters, random_state=seed, n_local_trials=1)
        model = MiniBatchKMeans(n_clusters=clusters, init=centres, n_init=1, batch_size=4096, random_state=seed,
                                max_no_improvement=5)
        return model.fit_predict(x)


class AloeStrategy(Strategy):
    name = "aloe"
    params = {"score": "pool score to threshold: gradnorm or energy, or any pool score (default gradnorm)", "tpr": "ID quantile of the threshold (default 0.95)",
              "pool_quantile": "pool quantile used without ID scores (default 0.5)",
              "kmeans_max_work": "N*M above which mini-batch k-means is used (default 5e6)",
              "n_init": "k-means restarts (default 3)"}

    def _select(self, pool: Pool, budget: int, seed: int, context: Context) -> Selection:
        params = context.params
        score_name = str(params.get("score", "gradnorm"))
        score = require_score(pool, score_name, self.name)
        score = np.where(np.isnan(score), -np.inf, score)
        id_scores = (context.id_scores or {}).get(score_name)
        if id_scores is not None and len(id_scores):
            tpr = float(params.get("tpr", 0.95))
            threshold = float(np.quantile(np.asarray(id_scores, dtype=np.float64), tpr))
            source = f"{tpr:.0%} TPR on held-out ID"
        else:
            q = float(params.get("pool_quantile", 0.5))
            finite = score[np.isfinite(score)]
            threshold = float(np.quantile(finite, q)) if len(finite) else np.inf
            source = f"pool quantile {q:.2f}: no id_scores[{score_name!r}] given"
        flagged = score > threshold

        n = len(pool)
        m = min(2 * max(budget, num_known(pool, context)), n)
        labels = cluster(l2_normalise(pool.features), m, seed, params)
        size = np.bincount(labels, minlength=m)
        n_flagged = np.bincount(labels, weights=flagged, minlength=m)
        finite_score = np.where(np.isfinite(score), score, 0.0)
        mean = np.bincount(labels, weights=finite_score, minlength=m) / np.maximum(size, 1)
        ratio = n_flagged / np.maximum(size, 1)
        ids = np.arange(m)
        ranked = np.lexsort((ids, -mean, -ratio))
        ranked = ranked[size[ranked] > 0][:budget]
        # best member per cluster: sort by (cluster, -score, index), first of each cluster
        by_cluster = np.lexsort((np.arange(n), -score, labels))
        first = np.ones(n, dtype=bool)
        first[1:] = labels[by_cluster][1:] != labels[by_cluster][:-1]
        best = np.full(m, -1, dtype=np.int64)
        best[labels[by_cluster][first]] = by_cluster[first]

        chosen = [int(best[c]) for c in ranked]
        reasons = [f"aloe: cluster {c} (OOD ratio {ratio[c]:.2f}: {int(n_flagged[c])}/{size[c]} flagged, "
                   f"mean {score_name} {mean[c]:.4g}), highest {score_name} {score[best[c]]:.4g}; "
                   f"λ={threshold:.4g} ({source}), M={m}" for c in ranked]
        if len(chosen) < budget:
            taken = np.zeros(n, dtype=bool)
            taken[chosen] = True
            order = np.argsort(-score, kind="stable")
            for i in order[~taken[order]][:budget - len(chosen)]:
                chosen.append(int(i))
                reasons.append(f"aloe: fill by score ({len(ranked)} non-empty clusters < budget {budget}), "
                               f"{score_name} {score[i]:.4g}, cluster {labels[i]}; λ={threshold:.4g} ({source})")
        return Selection(np.array(chosen, dtype=np.int64), reasons)
