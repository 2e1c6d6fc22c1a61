"""Score histograms against the calibrated thresholds and ROC curves, per score: what `oodguard evaluate --plot
DIR` writes and the MNIST benchmark draws (matplotlib, the ``bench`` extra; never needed for serving)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .ood_metrics import auroc


def version_figure(scorer, in_dist, ood_sets, path: str | Path, id_name: str = "ID") -> Path:
    """:func:`score_figure` of a :class:`~oodguard.evaluation.VersionScorer`'s scores and thresholds, for its
    scored ID set and scored OOD sets (:class:`~oodguard.evaluation.ScoredSet`)."""
    names = scorer.score_names
    return score_figure(names, {s: scorer.calibration.thresholds[s].threshold for s in names}, in_dist.scores,
                        {s.name: s.scores for s in ood_sets}, path, id_name)


def score_figure(score_names: list[str], thresholds: dict[str, float], in_dist: dict[str, np.ndarray],
                 ood_sets: dict[str, dict[str, np.ndarray]], path: str | Path, id_name: str = "ID") -> Path:
    """One histogram (ID against each OOD set, the threshold as a dashed line) and one ROC curve (OOD
    positive) per score, four per row; written to ``path`` (PNG)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("plots need matplotlib: pip install \"oodguard[bench]\"") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    rows = -(-len(score_names) // 4)  # histogram rows, then as many ROC rows
    fig, axes = plt.subplots(2 * rows, 4, figsize=(20, 8 * rows), squeeze=False)
    for i, score in enumerate(score_names):
        ax = axes[i // 4, i % 4]
        values = np.concatenate([in_dist[score], *[s[score] for s in ood_sets.values()]])
        values = values[np.isfinite(values)]
        bins = np.linspace(*np.percentile(values, [0.5, 99.5]), 60)
        ax.hist(in_dist[score], bins=bins, alpha=0.6, density=True, label=f"{id_name} (ID)")
        for name, s in ood_sets.items():
            ax.hist(s[score], bins=bins, alpha=0.4, density=True, histtype="stepfilled", label=name)
        ax.axvline(thresholds[score], color="k", ls="--", lw=1, label="95% TPR threshold")
        ax.set_title(f"{score}: score histogram")
        ax.legend(fontsize=7)
        ax = axes[rows + i // 4, i % 4]
        for name, s in ood_sets.items():
            truth = np.r_[np.zeros(len(in_dist[score])), np.ones(len(s[score]))]
            values = np.r_[in_dist[score], s[score]].astype(np.float64)  # NaN fails closed: most OOD
            fpr, tpr, _ = roc_curve(truth, np.nan_to_num(values, nan=1e300, posinf=1e300, neginf=-1e300))
            ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(in_dist[score], s[score]):.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"{score}: ROC (OOD positive)")
        ax.set_xlabel("FPR (ID flagged)")
        ax.set_ylabel("TPR (OOD flagged)")
        ax.legend(fontsize=7, loc="lower right")
    for j in range(len(score_names), 4 * rows):  # empty cells
        axes[j // 4, j % 4].axis("off")
        axes[rows + j // 4, j % 4].axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
