#!/usr/bin/env python
"""The MNIST OOD benchmark and what the fused head costs, in one run.

1. Train LeNet-5 on MNIST (seeded; the checkpoint is cached under --cache), holding out 10% of the
   training split, half of which calibrates the thresholds.
2. Export with the fused head (full bank) and evaluate every score on the MNIST test set against
   Fashion-MNIST (near), uniform noise and Gaussian blobs (far), and any further --ood sets.
3. Reduced bank (RS): near-OOD AUROC and batch-64 latency for bank fractions 100/30/10/3%.
4. Cost: fused vs logits-only ONNX Runtime latency at batch 1 and 64, LeNet-5 (MNIST bank) and
   ResNet-18 at 32x32 with a 5,000-sample bank; ratios measured interleaved in this one run.

Writes report.md, report.json and mnist_scores.png to --out. Data comes from --data (default
../shared/data); held-out acceptance sets are never read unless given with --ood.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cost  # noqa: E402
from oodguard.datasets import data_root  # noqa: E402
from oodguard.evaluation import OodSet, VersionScorer, build_report, parse_ood, resolve_dataset, score_sets  # noqa: E402
from oodguard.export.pipeline import export_model  # noqa: E402
from oodguard.export.spec import spec_from_training  # noqa: E402
from oodguard.export.training_job import CHECKPOINT_FILE, RECORD_FILE, run_training  # noqa: E402
from oodguard.ood_metrics import auroc  # noqa: E402
from oodguard.plots import version_figure  # noqa: E402

LOGIT_SCORES = ("energy", "msp", "maxlogit")
FRACTIONS = (1.0, 0.3, 0.1, 0.03)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None):
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data_root(), help="folder with mnist/ and fashion_mnist/ (default: $OODGUARD_DATA, else ../shared/data)")
    parser.add_argument("--out", type=Path, default=root / "runs" / "bench" / "mnist-report", help="results folder")
    parser.add_argument("--cache", type=Path, default=root / "runs" / "bench" / "cache", help="checkpoint cache")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ood", action="append", default=[], metavar="NAME=PATH[:near|far]", help="further OOD sets")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="bank fractions for the RS trade-off")
    parser.add_argument("--cost-seconds", type=float, default=12.0, help="timing budget per model and batch size")
    parser.add_argument("--multi-layer-bank-size", type=int, default=None, metavar="N",
                        help="bank of the multi-layer scores in the full export (default: the full bank, as the "
                        "penultimate SISOM uses, so that the two compare on the same bank; export's own default: 5000)")
    return parser.parse_args(argv)


def train_cached(args) -> Path:
    work = args.cache / f"mnist-lenet5-seed{args.seed}-epochs{args.epochs}"
    if (work / CHECKPOINT_FILE).exists() and (work / RECORD_FILE).exists():
        log(f"using cached checkpoint {work / CHECKPOINT_FILE}")
    else:
        run_training(backbone="lenet5", data=str(args.data / "mnist" / "train-images-idx3-ubyte.gz"), out_dir=work,
                     epochs=args.epochs, seed=args.seed, holdout=0.1, progress=log)
    return work / CHECKPOINT_FILE


BANK_SCORES = ("sisom", "sisome", "knn", "fused")


def rs_tradeoff(checkpoint: Path, repository: Path, full, full_scores: tuple[dict, dict], fractions,
                mnist_test: str, fashion: str, seed: int) -> list[dict]:
    """Near-OOD AUROC (Fashion-MNIST) of the bank-based scores and batch-64 latency per bank fraction.
    ``full_scores`` are the full bank's (ID, near-OOD) scores, already computed by the evaluation. A reduced
    bank is exported as the export chooses it (``auto``: ProbCover or a class-stratified random bank, whichever
    is not worse on validation) and with the other method forced, so both are measured on the benchmark."""
    rows = []
    bank_total = full.calibration.model["bank_size"]
    for fraction in fractions:
        methods = {}
        if fraction >= 1.0:
            result = full
            id_scores, near = full_scores
            methods["full"] = {s: auroc(id_scores[s], near[s]) for s in BANK_SCORES if s in near}
            chosen, comparison = "full", {}
        else:
            size = int(round(fraction * bank_total))
            result = export_model(spec_from_training(checkpoint, repository, "mnist", bank_size=size), progress=lambda line: None)
            chosen, comparison = result.calibration.model["bank_method"], result.calibration.model.get("bank_comparison", {})
            other = "random" if chosen == "probcover" else "probcover"
            forced = export_model(spec_from_training(checkpoint, repository, "mnist", bank_size=size, bank_method=other),
                                  progress=lambda line: None)
            for method, version in ((chosen, result), (other, forced)):
                scorer = VersionScorer(version.version_dir)
                id_scores = scorer.score("id", resolve_dataset(mnist_test, scorer.preprocessing)).scores
                near = scorer.score("fashion", resolve_dataset(fashion, scorer.preprocessing)).scores
                methods[method] = {s: auroc(id_scores[s], near[s]) for s in BANK_SCORES if s in near}
        scorer = VersionScorer(result.version_dir)
        x = np.random.default_rng(seed).normal(size=(64, 1, 28, 28)).astype(np.float32)
        cost.run_ms(scorer.model.session, x)
        latency = float(np.median([cost.run_ms(scorer.model.session, x) for _ in range(15)]))
        row = {"fraction": fraction, "bank_size": result.calibration.model["bank_size"], "version": result.version,
               "alpha": result.calibration.model["score_params"]["sisom"]["alpha"], "latency_ms_b64": latency,
               "method": chosen, "benchmark_auroc": methods,
               "validation_worst": {m: {n: r["worst"] for n, r in rows_.items()} for m, rows_ in comparison.items()}}
        row.update({f"auroc_{s}": methods[chosen][s] for s in BANK_SCORES if s in methods[chosen]})
        rows.append(row)
        log(f"RS {fraction:.0%}: bank {row['bank_size']} ({chosen}), near AUROC "
            + "; ".join(f"{m}: " + ", ".join(f"{s} {v:.4f}" for s, v in a.items()) for m, a in methods.items())
            + f", batch-64 latency {latency:.1f} ms")
    return rows


def fused_decision_cost(result, out_dir: Path, budget_s: float, batch: int = 64) -> dict:
    """What the fused decision adds per item at batch ``batch``, measured interleaved in this run: (a) in the
    graph, the exported model against the same model without the fused score (ONNX Runtime); (b) in the
    gateway, the decision rule deciding by fused (with its driver) against deciding by sisome."""
    from oodguard.export import fused as fused_head
    from oodguard.serve.decision import DecisionPolicy, DecisionRule

    components = fused_head.FusedModel(result.model.classifier,
                                       {n: s for n, s in result.model.scores.items() if n != "fused"}).eval()
    without = fused_head.export_onnx(components, (1, 28, 28), out_dir / "without_fused.onnx")
    graph = cost.compare_latency(result.version_dir / "model.onnx", without, (1, 28, 28), batches=(batch,),
                                 budget_s=budget_s)[0]
    scorer = VersionScorer(result.version_dir)
    x = np.random.default_rng(0).normal(size=(batch, 1, 28, 28)).astype(np.float32)
    outputs = scorer.model.run(x)
    by_fused = DecisionRule(scorer.calibration, DecisionPolicy())
    by_sisome = DecisionRule(scorer.calibration, DecisionPolicy(("sisome",), "any", ()))
    samples = {"fused": [], "sisome": []}
    deadline = time.perf_counter() + budget_s / 2
    while time.perf_counter() < deadline or len(samples["fused"]) < 50:
        for name, rule in (("fused", by_fused), ("sisome", by_sisome)):
            start = time.perf_counter()
            decisions = rule(outputs)
            [decisions.verdict(i) for i in range(len(decisions))]  # what a response needs, driver included
            samples[name].append(time.perf_counter() - start)
    graph_us = (graph.fused_ms - graph.logits_ms) * 1000.0 / batch
    decision_us = (np.median(samples["fused"]) - np.median(samples["sisome"])) * 1e6 / batch
    return {"batch": batch, "graph_ms_with": graph.fused_ms, "graph_ms_without": graph.logits_ms,
            "graph_us_per_item": graph_us, "decision_us_per_item": float(decision_us),
            "total_us_per_item": float(graph_us + decision_us)}


MULTILAYER_PAIRS = (("sisom", "sisom_ml"), ("sisome", "sisome_ml"))


def multilayer_summary(calibration_model: dict, evaluation: dict) -> dict:
    """Multi-layer SISOM against the penultimate score: AUROC per OOD set, the layers and steepness chosen, and
    whether the fused decision took a multi-layer component."""
    meta = calibration_model["score_params"]["sisom_ml"]
    return {"layers": meta["layers"], "alpha": meta["alpha"], "relative_alpha": meta["alpha_search"].get("relative_alpha"),
            "auroc": {name: {s: v["metrics"][name]["auroc"] for s, v in evaluation["sets"].items()}
                      for pair in MULTILAYER_PAIRS for name in pair},
            "fused_components": calibration_model["score_params"]["fused"]["components"]}


def validation_ranking(calibration_model: dict, evaluation: dict) -> dict:
    """Does the export's validation OOD predict the benchmark? Per score: the worst-group validation AUROC
    (synthetic near/far, recorded by the fused choice) next to the benchmark's near and far AUROC and the worse
    of the two; ranks and Spearman's rho between the two worst-group columns."""
    from scipy.stats import spearmanr

    single = calibration_model["score_params"]["fused"]["selection"]["single_scores"]
    groups = evaluation["groups"]
    rows = {}
    for name, result in single.items():
        bench = {g: groups[g][name]["auroc"] for g in ("near", "far") if g in groups}
        rows[name] = {"validation": result["auroc"], "validation_worst": result["worst"], "benchmark": bench,
                      "benchmark_worst": min(bench.values())}
    names = list(rows)
    val = [rows[n]["validation_worst"] for n in names]
    bench = [rows[n]["benchmark_worst"] for n in names]
    for column, key in ((val, "validation_rank"), (bench, "benchmark_rank")):
        order = sorted(range(len(names)), key=lambda i: -column[i])
        for rank, i in enumerate(order, 1):
            rows[names[i]][key] = rank
    rho = spearmanr(val, bench).statistic if len(names) > 2 else float("nan")
    return {"scores": rows, "spearman_rho": float(rho)}


def smallest_within(rows: list[dict], score: str, points: float = 0.5) -> dict:
    full = next(r for r in rows if r["fraction"] >= 1.0)[f"auroc_{score}"]
    ok = [r for r in rows if full - r[f"auroc_{score}"] <= points / 100]
    return min(ok, key=lambda r: r["fraction"])


def markdown(report: dict) -> str:
    ev = report["evaluation"]
    lines = ["# MNIST OOD benchmark (LeNet-5, fused head)", "",
             f"Checkpoint: {report['checkpoint']} (seed {report['seed']}, {report['epochs']} epochs); bank "
             f"{report['bank_size']} training images; calibration on {report['calibration_n']} held-out MNIST training "
             f"images; SISOM alpha {report['alpha']} ({report['alpha_procedure']}). Total time {report['seconds']['total']:.0f} s.",
             "", "Conventions: " + ev["conventions"] + ". Metrics in %.", ""]
    sets = list(ev["sets"])
    lines.append("| score | " + " | ".join(f"{s} AUROC | {s} FPR@95" for s in sets) + " | near AUROC | far AUROC | TPR@cal on MNIST test |")
    lines.append("|---" * (2 * len(sets) + 4) + "|")
    for score in report["scores"]:
        cells = " | ".join(f"{100 * ev['sets'][s]['metrics'][score]['auroc']:.2f} | {100 * ev['sets'][s]['metrics'][score]['fpr_at_95tpr']:.2f}" for s in sets)
        groups = " | ".join(f"{100 * ev['groups'][g][score]['auroc']:.2f}" if g in ev["groups"] else "-" for g in ("near", "far"))
        tpr = ev["sets"][sets[0]]["metrics"][score]["calibrated_tpr"]
        lines.append(f"| {score} | {cells} | {groups} | {100 * tpr:.2f} |")
    goal = report["goal"]
    lines += ["", "## Goal: SISOM/SISOMe near-OOD AUROC ≥ best logit-based score", "",
              f"Best logit-based near-OOD AUROC: {goal['best_logit_score']} {100 * goal['best_logit_auroc']:.2f}; "
              f"SISOM {100 * goal['sisom']:.2f}, SISOMe {100 * goal['sisome']:.2f} → "
              + ("**met**." if goal["met"] else "**not met**: " + goal["note"]),
              "", "Calibration on unseen data (MNIST test, realised TPR within [94%, 96%] for every score): "
              + ("**holds**" if report["calibration_holds"] else "**violated**") + ".", "",
              "SISOM alpha search (validation AUROC on synthetic OOD built from training images): "
              + ", ".join(f"{a:g}: {o:.4f}" for a, o in zip(report["alpha_search"]["grid"], report["alpha_search"]["objective"])),
              "", "## The fused decision (default) against each component", "",
              f"fused = {report['fused']['combination']}({', '.join(report['fused']['components'])}) over "
              f"{report['fused']['references_n']} reference calibration images. Near AUROC "
              f"{100 * report['fused']['near']:.2f} (best single: {report['fused']['best_near'][0]} "
              f"{100 * report['fused']['best_near'][1]:.2f}), far AUROC {100 * report['fused']['far']:.2f} (best single: "
              f"{report['fused']['best_far'][0]} {100 * report['fused']['best_far'][1]:.2f}); worse of the two "
              f"{100 * report['fused']['worst']:.2f} against the best single score's {report['fused']['best_worst'][0]} "
              f"{100 * report['fused']['best_worst'][1]:.2f}.", "",
              "Target (fused ≥ the best single score on near and on far mean AUROC at once): near "
              + ("met" if report["fused"]["near"] >= report["fused"]["best_near"][1] else "**not met**") + ", far "
              + ("met" if report["fused"]["far"] >= report["fused"]["best_far"][1] else "**not met**")
              + f" (by {100 * (report['fused']['far'] - report['fused']['best_far'][1]):+.2f} points); on the worse "
              "of the two groups fused is " + ("at least as good as" if report["fused"]["worst"] >= report["fused"]["best_worst"][1]
                                                else "worse than") + " every single score.", "",
              "## Does the validation OOD predict the benchmark?", "",
              "Validation: synthetic corruptions of training images (near: class blends and jigsaws; far: pixel "
              "permutations), as the export uses them; benchmark: the sets above. AUROC in %, rank 1 = best worse-group.", "",
              "| score | validation near | validation far | validation rank | benchmark near | benchmark far | benchmark rank |",
              "|---|---|---|---|---|---|---|"]
    ranking = report["validation_ranking"]
    for name, r in sorted(ranking["scores"].items(), key=lambda kv: kv[1]["benchmark_rank"]):
        lines.append(f"| {name} | {100 * r['validation'].get('near', float('nan')):.2f} | "
                     f"{100 * r['validation'].get('far', float('nan')):.2f} | {r['validation_rank']} | "
                     f"{100 * r['benchmark'].get('near', float('nan')):.2f} | {100 * r['benchmark'].get('far', float('nan')):.2f} | "
                     f"{r['benchmark_rank']} |")
    lines += ["", f"Spearman's rho between the two rankings: {ranking['spearman_rho']:.2f}.",
              "", "## Reduced bank (RS): near-OOD (Fashion-MNIST) AUROC and latency", "",
              "Each reduced bank is exported as the export chooses it (ProbCover unless a class-stratified random bank of "
              "the same size is better on validation for some bank-based score) and with the other method forced.", "",
              "| bank fraction | bank size | chosen | method | SISOM | SISOMe | kNN | fused | batch-64 latency (ms) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rs"]:
        for method, a in r["benchmark_auroc"].items():
            cells = " | ".join(f"{100 * a[s]:.2f}" if s in a else "-" for s in BANK_SCORES)
            lines.append(f"| {r['fraction']:.0%} | {r['bank_size']} | {'yes' if method == r['method'] else ''} | {method} | "
                         f"{cells} | {r['latency_ms_b64']:.1f} |")
    lines += ["", "Smallest fraction within 0.5 AUROC points of the full bank (chosen method): "
              + ", ".join(f"{s}: {report['rs_smallest'][s]:.0%}" for s in report["rs_smallest"]), "",
              "## What the fused head costs (ONNX Runtime, CPU, this machine; fused vs logits-only, interleaved runs)", "",
              "| model | batch | fused ms | logits-only ms | fused items/s | logits items/s | overhead |", "|---|---|---|---|---|---|---|"]
    for r in report["cost"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['fused_ms']:.2f} | {r['logits_ms']:.2f} | {r['fused_per_s']:.0f} | "
                     f"{r['logits_per_s']:.0f} | {r['overhead_pct']:+.1f}% |")
    fc = report["fused_cost"]
    lines += ["", f"The fused decision at batch {fc['batch']} (LeNet-5, full bank): in the graph {fc['graph_ms_with']:.2f} ms "
              f"with it vs {fc['graph_ms_without']:.2f} ms without ({fc['graph_us_per_item']:+.2f} µs/item); in the gateway's "
              f"decision (fused with its driver vs sisome) {fc['decision_us_per_item']:+.2f} µs/item; together "
              f"{fc['total_us_per_item']:+.2f} µs/item against the ≤ 20 µs target → "
              + ("**met**" if fc["total_us_per_item"] <= 20 else "**not met**") + "."]
    ml = report["multilayer"]
    lines += ["", "## Multi-layer SISOM against the penultimate layer", "",
              f"Layers {', '.join(ml['layers'])}; steepness (relative to each layer's scale) "
              + ", ".join(f"{k} {v:g}" for k, v in (ml["relative_alpha"] or {}).items())
              + f"; fused components: {', '.join(ml['fused_components'])}.", "",
              "| score | " + " | ".join(ev["sets"]) + " |", "|---" * (len(ev["sets"]) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{100 * ml['auroc'][name][s]:.2f}" for s in ev["sets"]) + " |" for name in ml["auroc"]]
    target = next(r for r in report["cost"] if r["model"].startswith("ResNet-18") and r["batch"] == 64)
    lines += ["", f"Target (ResNet-18, batch 64, fused adds ≤ 15%): {target['overhead_pct']:+.1f}% → "
              + ("**met**" if target["overhead_pct"] <= 15 else "**not met**") + ".", "", "![scores](mnist_scores.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if not (args.data / "mnist").is_dir() or not (args.data / "fashion_mnist").is_dir():
        print(f"error: MNIST / Fashion-MNIST not found under {args.data} (give --data)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    repository = args.out / "repository"
    shutil.rmtree(repository, ignore_errors=True)  # a scratch repository: versions of earlier runs would pile up
    mnist_test = str(args.data / "mnist" / "t10k-images-idx3-ubyte.gz")
    fashion = str(args.data / "fashion_mnist" / "t10k-images-idx3-ubyte.gz")
    oods = [OodSet("fashion-mnist", fashion, "near"), OodSet("uniform-noise", "synthetic:uniform", "far"),
            OodSet("gaussian-blobs", "synthetic:blobs", "far"), *[parse_ood(o) for o in args.ood]]
    seconds = {}

    checkpoint = train_cached(args)
    seconds["train"] = time.perf_counter() - start
    log("exporting with the full bank (--multi-layer: the multi-layer scores are compared below)")
    full = export_model(spec_from_training(checkpoint, repository, "mnist", multi_layer=True,
                                           multi_layer_bank_size=args.multi_layer_bank_size), progress=log)
    seconds["export_full"] = sum(full.seconds.values())
    scorer = VersionScorer(full.version_dir)
    log("evaluating")
    in_dist, scored, id_info = score_sets(scorer, mnist_test, oods, seed=args.seed)
    evaluation = build_report(scorer, mnist_test, in_dist, oods, scored, id_info)
    version_figure(scorer, in_dist, scored[:3], args.out / "mnist_scores.png", id_name="MNIST test")
    seconds["evaluate"] = time.perf_counter() - start - seconds["train"] - seconds["export_full"]

    near = evaluation["groups"]["near"]
    best_logit = max(LOGIT_SCORES, key=lambda s: near[s]["auroc"])
    sisom_meta = full.calibration.model["score_params"]["sisom"]
    goal = {"best_logit_score": best_logit, "best_logit_auroc": near[best_logit]["auroc"],
            "sisom": near["sisom"]["auroc"], "sisome": near["sisome"]["auroc"]}
    goal["met"] = max(goal["sisom"], goal["sisome"]) >= goal["best_logit_auroc"]
    goal["note"] = ("" if goal["met"] else f"short by {100 * (goal['best_logit_auroc'] - max(goal['sisom'], goal['sisome'])):.2f} "
                    "points; tried: alpha by validation AUROC on synthetic OOD (grid in the report), full and reduced banks (RS table), "
                    "leave-one-out SISOMe normalisation on the bank")
    fused_meta = full.calibration.model["score_params"]["fused"]
    singles = [n for n in scorer.score_names if n != "fused"]
    far = evaluation["groups"]["far"]
    best_near = max(singles, key=lambda n: near[n]["auroc"])
    best_far = max(singles, key=lambda n: far[n]["auroc"])
    best_worst = max(singles, key=lambda n: min(near[n]["auroc"], far[n]["auroc"]))
    fused_summary = {"components": fused_meta["components"], "combination": fused_meta["combination"],
                     "references_n": fused_meta["references_n"], "near": near["fused"]["auroc"], "far": far["fused"]["auroc"],
                     "worst": min(near["fused"]["auroc"], far["fused"]["auroc"]),
                     "best_near": (best_near, near[best_near]["auroc"]), "best_far": (best_far, far[best_far]["auroc"]),
                     "best_worst": (best_worst, min(near[best_worst]["auroc"], far[best_worst]["auroc"]))}
    first_set = next(iter(evaluation["sets"].values()))["metrics"]
    calibration_holds = all(0.94 <= first_set[s]["calibrated_tpr"] <= 0.96 for s in scorer.score_names)

    log("reduced-bank trade-off")
    fractions = [float(f) for f in args.fractions.split(",")]
    rs = rs_tradeoff(checkpoint, repository, full, (in_dist.scores, scored[0].scores), fractions, mnist_test, fashion, args.seed)
    seconds["rs"] = time.perf_counter() - start - sum(seconds.values())

    log("cost: fused vs logits-only")
    from oodguard.export.backbones import load_classifier
    from oodguard.export.training_job import TrainingRecord

    record = TrainingRecord.load(checkpoint.with_name(RECORD_FILE))
    lenet_logits = cost.export_logits_only(load_classifier(record.backbone, checkpoint), (1, 28, 28), args.out / "lenet_logits.onnx")
    ml_bank = full.calibration.model["multi_layer_bank"]["size"]
    cost_rows = [t.row(f"LeNet-5 (MNIST bank {full.calibration.model['bank_size']}, --multi-layer: their bank {ml_bank})")
                 for t in cost.compare_latency(full.version_dir / "model.onnx", lenet_logits, (1, 28, 28), budget_s=args.cost_seconds)]
    resnet_fused, resnet_logits = cost.resnet18_models(args.out / "resnet18")
    cost_rows += [t.row("ResNet-18 32x32 (bank 5000)")
                  for t in cost.compare_latency(resnet_fused, resnet_logits, (3, 32, 32), budget_s=args.cost_seconds)]
    resnet_ml, _ = cost.resnet18_models(args.out / "resnet18", multi_layer=True)
    cost_rows += [t.row("ResNet-18 32x32 (bank 5000, --multi-layer)")
                  for t in cost.compare_latency(resnet_ml, resnet_logits, (3, 32, 32), budget_s=args.cost_seconds)]
    for row in cost_rows:
        log(f"cost {row['model']} batch {row['batch']}: fused {row['fused_ms']:.2f} ms vs logits {row['logits_ms']:.2f} ms "
            f"({row['overhead_pct']:+.1f}%)")
    fused_cost = fused_decision_cost(full, args.out, args.cost_seconds)
    log(f"fused decision cost at batch 64: graph {fused_cost['graph_us_per_item']:+.2f} us/item, gateway decision "
        f"{fused_cost['decision_us_per_item']:+.2f} us/item")
    seconds["cost"] = time.perf_counter() - start - sum(seconds.values())
    seconds["total"] = time.perf_counter() - start

    report = {
        "checkpoint": str(checkpoint), "seed": args.seed, "epochs": args.epochs, "scores": scorer.score_names,
        "bank_size": full.calibration.model["bank_size"], "calibration_n": full.calibration.data["n"],
        "alpha": sisom_meta["alpha"], "alpha_procedure": sisom_meta["alpha_search"]["procedure"],
        "alpha_search": sisom_meta["alpha_search"], "evaluation": evaluation, "goal": goal,
        "calibration_holds": calibration_holds, "rs": rs,
        "rs_smallest": {s: smallest_within(rs, s)["fraction"] for s in BANK_SCORES if f"auroc_{s}" in rs[0]},
        "fused": fused_summary, "validation_ranking": validation_ranking(full.calibration.model, evaluation),
        "multilayer": multilayer_summary(full.calibration.model, evaluation),
        "cost": cost_rows, "fused_cost": fused_cost, "seconds": seconds,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    log(f"wrote {args.out / 'report.md'}, report.json and mnist_scores.png in {seconds['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
