"""Smoke test of bench/open_set_benchmark.py: one round of the closed loop (train → fused scores → SQLite
queue → run_harvest → oracle → retrain) on a tiny pool of real MNIST / Fashion-MNIST images."""

import json

import numpy as np

from bench_scripts import load_bench


def load_benchmark():
    return load_bench("open_set_benchmark")


def test_one_round_on_a_tiny_pool_writes_a_consistent_report(shared_data, tmp_path):
    bench = load_benchmark()
    out = tmp_path / "report"
    report = bench.main([
        "--data", str(shared_data), "--out", str(out), "--strategies", "random", "--seeds", "1", "--rounds", "1",
        "--budget", "20", "--pool-known", "300", "--pool-mnist-unknown", "150", "--pool-fashion", "150",
        "--calibration-per-class", "10", "--test-size", "1000", "--steps", "150", "--workers", "1",
        "--final-trainings", "2",
    ])
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "open_set.png", "work"}
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["protocol"]["strategies"] == ["random"] and report["protocol"]["seeds"] == [0]
    [run] = report["runs"]
    assert [r["round"] for r in run["rounds"]] == [0, 1]
    assert [r["labels"] for r in run["rounds"]] == [60, 80]
    last = run["rounds"][-1]
    assert last["known_picked"] + last["unknown_picked"] == 20
    assert 0.0 <= last["precision"] <= 1.0 and 0.0 <= last["recall"] <= 1.0
    assert last["recall"] == last["known_picked"] / 300
    assert 0 <= last["discovered"] <= 14 and len(run["discovered"]) == last["discovered"]
    assert sum(run["known_per_class"]) == 60 + last["known_picked"]
    assert all(r["accuracy"] > 0.5 for r in run["rounds"])
    # the final accuracy is the mean of two trainings of the final labeled set; the first one is kept
    assert len(last["accuracies"]) == 2 and last["accuracy"] == np.mean(last["accuracies"])
    assert last["accuracy_first"] == last["accuracies"][0] and "accuracies" not in run["rounds"][0]
    [row] = report["summary"]
    assert row["accuracy_first_per_seed"] == [100 * last["accuracy_first"]]
    assert row["gain_first_over_random_per_seed"] == [0.0]
    assert row["strategy"] == "random" and row["accuracy_mean"] > 50.0
    assert 0.0 <= row["precision_mean"] <= 1.0 and 0.0 <= row["recall_mean"] <= 1.0
    # the harvest went through the real queue and exported what a labeling tool imports
    harvest = out / "work" / "seed0" / "random" / "harvest-round0"
    assert len((harvest / "manifest.jsonl").read_text().splitlines()) == 20
    assert len(json.loads((harvest / "tasks.json").read_text())) == 20
    assert len(list((harvest / "images").glob("*.png"))) == 20
    assert "| random |" in (out / "report.md").read_text()


def test_production_options_unknown_data_flagged_queue_and_strategy_parameters(shared_data, tmp_path):
    bench = load_benchmark()
    rng = np.random.default_rng(0)
    blobs = np.zeros((400, 28, 28), np.uint8)  # two unknown classes: bright squares and noise
    blobs[:200, 6:22, 6:22] = 255
    blobs[200:] = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "unknowns.npz", images=blobs, labels=np.repeat([0, 1], 200), class_names=np.array(["square", "noise"]))
    out = tmp_path / "report"
    report = bench.main([
        "--data", str(shared_data), "--out", str(out), "--strategies", "open-quota,aloe:score=energy", "--seeds", "1",
        "--rounds", "2", "--budget", "20", "--pool-known", "300", "--pool-mnist-unknown", "150", "--pool-fashion", "150",
        "--unknown-data", str(tmp_path / "unknowns.npz"), "--queue", "flagged", "--sample-fraction", "0.5",
        "--calibration-per-class", "10", "--calibration-in-budget", "--min-epochs", "20", "--test-size", "500",
        "--workers", "1",
    ])
    assert report["protocol"]["unknown_classes"] == ["square", "noise"] and report["protocol"]["train_unknown"] is True
    assert report["protocol"]["strategies"] == ["open-quota", "aloe:score=energy"]
    for run in report["runs"]:
        assert [r["labels"] for r in run["rounds"]] == [120, 140, 160]  # 60 calibration + 60 seed + 2 x 20
        assert all(r["discovered"] <= 2 for r in run["rounds"]) and run["unknown_classes"] == 2
        # the flagged queue holds fewer than the 599-600 unlabeled pool items (the unflagged half is sampled)
        assert 20 < run["rounds"][0]["queued"] < 600 and 20 < run["rounds"][1]["queued"] < 580
    [quota] = [r for r in report["runs"] if r["strategy"] == "open-quota"]
    work = out / "work" / "seed0"
    why = [json.loads(line)["why"] for line in (work / "open-quota" / "harvest-round1" / "manifest.jsonl").read_text().splitlines()]
    unknowns = quota["rounds"][1]["unknown_picked"]
    assert unknowns > 0  # a flagged queue is mostly unknowns
    # round 2 trains the (K+1)-way head on round 1's labeled unknowns (given to the harvest as a labels CSV)
    assert all(f"{unknowns} labeled unknown" in w for w in why)
    aloe_why = (work / "aloe:score=energy" / "harvest-round0" / "manifest.jsonl").read_text()
    assert "mean energy" in aloe_why
    row = report["summary"][0]
    assert len(row["accuracy_per_seed"]) == 1 and row["gain_over_random_per_seed"] is None
    assert "of 2)" in (out / "report.md").read_text()


def test_final_trainings_must_be_positive(capsys):
    bench = load_benchmark()
    try:
        bench.parse_args(["--final-trainings", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--final-trainings 0 was accepted")
    assert "--final-trainings must be at least 1, got 0" in capsys.readouterr().err


def test_train_unknown_teaches_the_backbone_the_labeled_unknowns_and_serves_the_known_outputs(shared_data):
    """With the default ``--train-unknown`` the images labeled unknown are a (K+1)-th training class and the
    served model keeps the K known outputs: held-out unknowns (other digits 6-9) get lower known-class logits than
    known digits, by a clearly larger margin than when the unknowns are left out (``--no-train-unknown``, which
    ignores them: the same weights as training without them)."""
    import torch
    from sklearn.metrics import roc_auc_score

    from oodguard.datasets import load_dataset

    bench = load_benchmark()
    ds = load_dataset(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    images, labels = ds.images, ds.labels.astype(np.int64)
    rng = np.random.default_rng(0)
    known = np.concatenate([rng.choice(np.flatnonzero(labels == c), 20, replace=False) for c in range(6)])
    unknown = rng.permutation(np.flatnonzero(labels >= 6))
    test_known = np.setdiff1d(np.flatnonzero(labels < 6), known)[:500]
    prep = bench.Preproc(0.13, 0.31)

    def served(flags, unknown_x):
        args = bench.parse_args(["--steps", "150", *flags])
        return bench.train_model(images[known], labels[known], prep, 0, args, unknown_x)

    def auroc(model):  # known (0) vs held-out unknown (1) by max known logit, lower = more unknown
        with torch.no_grad():
            k = model(torch.from_numpy(prep(images[test_known]))).numpy().max(axis=1)
            u = model(torch.from_numpy(prep(images[unknown[120:620]]))).numpy().max(axis=1)
        return roc_auc_score(np.r_[np.zeros(len(k)), np.ones(len(u))], -np.r_[k, u])

    with_unknowns = served([], images[unknown[:120]])
    without = served(["--no-train-unknown"], images[unknown[:120]])
    assert with_unknowns.head.out_features == without.head.out_features == 6
    plain = served(["--no-train-unknown"], None)
    assert all(torch.equal(a, b) for a, b in zip(without.state_dict().values(), plain.state_dict().values()))
    assert auroc(with_unknowns) > auroc(without) + 0.03
