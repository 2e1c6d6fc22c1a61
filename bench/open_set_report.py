"""The figure of the open-set benchmark: accuracy, query precision, recall and unknown classes discovered vs labels
spent, one line per strategy (mean over seeds, shaded ± std). Reads the dict written as report.json.

    python bench/open_set_report.py runs/bench/open-set-report/report.json   # re-plot an existing report
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

PANELS = (("accuracy", "known-class test accuracy", 100.0), ("precision", "query precision (known share of batch)", 1.0),
          ("recall", "recall (known labeled / known in pool)", 1.0), ("discovered", "unknown classes discovered", 1.0))


def curves(report: dict, strategy: str, key: str, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    runs = [r for r in report["runs"] if r["strategy"] == strategy]
    rounds = [x for x in runs[0]["rounds"] if x[key] is not None]
    labels = np.array([x["labels"] for x in rounds])
    values = np.array([[x[key] for x in r["rounds"] if x[key] is not None] for r in runs], dtype=np.float64) * scale
    return labels, values.mean(axis=0), values.std(axis=0)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = report["protocol"]["strategies"]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.2 * len(PANELS), 4.4))
    colours = plt.get_cmap("tab10")
    for ax, (key, title, scale) in zip(axes, PANELS):
        for n, strategy in enumerate(strategies):
            labels, mean, std = curves(report, strategy, key, scale)
            ax.plot(labels, mean, marker="o", ms=3, color=colours(n % 10), label=strategy)
            ax.fill_between(labels, mean - std, mean + std, color=colours(n % 10), alpha=0.15, linewidth=0)
        if key == "discovered":
            title = f"{title} (of {len(report['protocol']['unknown_classes'])})"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("labels spent")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% (MNIST test digits 0-5)")
    axes[0].legend(fontsize=8)
    seeds = report["protocol"]["seeds"]
    fig.suptitle(f"Open-set AL through the harvest: MNIST 0-5 known, pool {report['protocol']['pool_size']}, "
                 f"B={report['protocol']['budget']}, {len(seeds)} seed(s), mean ± std", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    source = Path(sys.argv[1])
    plot(json.loads(source.read_text()), source.with_name("open_set.png"))
