"""How long each harvest strategy takes on a synthetic pool (default 100,000 items, D=84, K=10 known classes
+ an "unknown" output), printed as seconds per strategy.

    python bench/strategy_timing.py [--n 100000] [--budget 100 1000] [--labeled 10000] [--only aloe ...]

coreset and badge subsample the pool to ``max_pool`` (default 20,000) items; the others see all of it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from oodguard.harvest import STRATEGIES, Context, Pool, get_strategy


def synthetic_pool(n: int, dim: int = 84, classes: int = 10, seed: int = 0) -> tuple[Pool, Context]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes + 5, dim)).astype(np.float32) * 3
    group = rng.integers(0, classes + 5, size=n)  # 10 known-class clusters + 5 novel ones
    features = np.abs(centres[group] + rng.normal(size=(n, dim)).astype(np.float32))
    weight = rng.normal(size=(classes + 1, dim)).astype(np.float32) / np.sqrt(dim)
    logits = features @ weight.T + rng.normal(size=(n, classes + 1)).astype(np.float32)
    novel = group >= classes
    scores = {name: rng.normal(size=n) + 2.0 * novel for name in ("sisom", "sisome", "energy", "gradnorm", "msp")}
    pool = Pool(np.array([f"r{i}" for i in range(n)]), features, logits, scores)
    labeled = np.abs(centres[rng.integers(0, classes, size=10000)] + rng.normal(size=(10000, dim)).astype(np.float32))
    context = Context(labeled_features=labeled, labeled_labels=None, known_classes=classes, unknown_label=classes,
                      id_scores={name: rng.normal(size=5000) for name in scores})
    return pool, context


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--budget", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--labeled", type=int, default=10000, help="labeled centres for coreset")
    parser.add_argument("--only", nargs="*", default=list(STRATEGIES))
    args = parser.parse_args(argv)
    pool, context = synthetic_pool(args.n)
    context.labeled_features = context.labeled_features[:args.labeled]
    print(f"pool: N={len(pool)}, D={pool.features.shape[1]}, outputs={pool.logits.shape[1]}; "
          f"labeled={len(context.labeled_features)}")
    print(f"{'strategy':18s}" + "".join(f"{'B=' + str(b):>10s}" for b in args.budget) + "  (seconds)")
    for name in args.only:
        row = []
        for budget in args.budget:
            start = time.perf_counter()
            selection = get_strategy(name).select(pool, budget, seed=0, context=context)
            row.append(time.perf_counter() - start)
            assert len(selection) == budget
        print(f"{name:18s}" + "".join(f"{t:10.2f}" for t in row), flush=True)


if __name__ == "__main__":
    main()
