"""`oodguard train`, `export`, `evaluate`, `validate-repo` and `serve`: each imports its side lazily, so serving
never imports torch."""

from __future__ import annotations

import argparse
import sys


def evaluate_command(args: argparse.Namespace) -> int:
    import json

    from oodguard import evaluation

    if not args.ood and not args.new_classes:
        raise ValueError("give at least one --ood NAME=PATH[:near|far|new] or --new-classes LABELS")
    oods = [evaluation.parse_ood(text) for text in args.ood]
    if args.new_classes:
        if args.classes and set(args.classes) & set(args.new_classes):
            raise ValueError(f"--new-classes {args.new_classes} overlap --classes {args.classes}")
        oods.append(evaluation.new_class_set(args.id_spec, args.new_classes))
    scorer = evaluation.VersionScorer(evaluation.resolve_version(args.repository, args.model, args.version))
    in_dist, scored, info = evaluation.score_sets(scorer, args.id_spec, oods, args.seed, args.classes)
    report = evaluation.build_report(scorer, args.id_spec, in_dist, oods, scored, info)
    print(json.dumps(report, indent=1) if args.json else evaluation.format_report(report))
    if args.plot:
        from oodguard.plots import version_figure

        path = version_figure(scorer, in_dist, scored, args.plot / "scores.png")
        print(f"wrote {path}", file=sys.stderr)
    return 0


def train_command(args: argparse.Namespace) -> int:
    from oodguard.export.training_job import run_training

    run_training(backbone=args.backbone, data=args.data, out_dir=args.out, classes=args.classes, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, seed=args.seed, holdout=args.holdout, input_shape=args.input_shape,
                 base=args.base, init_from=args.init_from, balance=args.balance, shift=args.shift,
                 outliers=args.outlier_data)
    return 0


def export_command(args: argparse.Namespace) -> int:
    from oodguard.export.pipeline import export_model
    from oodguard.export.spec import spec_from_flags, spec_from_training

    if args.demo:
        from oodguard.export.demo import format_table, run_demo

        if args.multi_layer:
            raise ValueError("--multi-layer is for --checkpoint exports; the digits demo exports the default scores")

        result = run_demo(args.repository, model_name=args.model or "digits", epochs=args.epochs, seed=args.seed)
        print("\nDigits demo (ID: test split of digits 0-7; AUROC, FPR@95TPR and the share flagged at the calibrated "
              "threshold, in %; higher score = more OOD):")
        print(format_table(result.table))
        print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
        return 0
    if not args.checkpoint or not args.model:
        raise ValueError("give --checkpoint and --model (or --demo digits)")
    fusion = {**({"components": tuple(args.fused_components.split(","))} if args.fused_components else {}),
              **({"combination": args.fused_combination} if args.fused_combination else {})}
    if "combination" in fusion and "components" not in fusion:
        raise ValueError("--fused-combination needs --fused-components too")
    if args.new_class_holdouts < 0:
        raise ValueError(f"--new-class-holdouts must be >= 0, got {args.new_class_holdouts}")
    if args.multi_layer_bank_size < 1:
        raise ValueError(f"--multi-layer-bank-size must be positive, got {args.multi_layer_bank_size}")
    overrides = dict(bank_size=args.bank_size, bank_method=args.bank_method, target_tpr=args.tpr, max_batch_size=args.max_batch_size,
                     multi_layer=args.multi_layer, multi_layer_bank_size=args.multi_layer_bank_size,
                     validation_ood_specs=list(args.validation_ood), new_class_holdouts=args.new_class_holdouts,
                     score_params={"sisom": {"alpha": args.alpha}, "knn": {"k": args.knn_k},
                                   **({"fused": fusion} if fusion else {})})
    if args.checkpoint.with_name("training.json").exists():
        spec = spec_from_training(args.checkpoint, args.repository, args.model, **overrides)
        if args.calibration_data:
            from oodguard.datasets import load_dataset

            spec.calibration_data = load_dataset(args.calibration_data)
    else:
        spec = spec_from_flags(args, **overrides)
    export_model(spec)
    return 0


def validate_command(args: argparse.Namespace) -> int:
    from oodguard.validate_repo import report

    return report(args.repository)


def serve_command(args: argparse.Namespace) -> int:
    from oodguard.serve.workers import run
    from oodguard.serve.settings import Settings, field_names

    flags = {name: getattr(args, name) for name in field_names()}
    settings = Settings.from_sources(flags)
    if not settings.repository.is_dir():  # both backends read every version's calibration.json from it
        raise ValueError(f"the model repository {settings.repository} is not a folder (give --repository DIR or "
                         "OODGUARD_REPOSITORY; `oodguard export --demo digits --repository DIR` makes one)")
    try:
        return run(settings)
    except OSError as exc:
        raise ValueError(str(exc)) from exc
