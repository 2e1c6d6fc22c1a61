"""The `oodguard` command line: the parser of every subcommand (each explains itself with its defaults), and
the value types its options take."""

from __future__ import annotations

import argparse
from pathlib import Path

from oodguard.label_ranges import parse_labels

from .clients import add_client_parsers
from .harvest import add_harvest_parsers
from .queue_command import add_queue_command


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes no abbreviated flags: ``--epoch 3`` is refused instead of read as ``--epochs 3``
    (an abbreviation is a guess, and one that a later flag makes ambiguous would change meaning unnoticed).
    ``add_subparsers`` makes its subparsers of the parent's class, so every subcommand, nested ones included,
    is a :class:`Parser` too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def subcommand_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser that ``args`` was parsed by last: ``oodguard queue list ...`` → the ``queue list`` parser."""
    while True:
        chooser = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, chooser.dest, None) if chooser is not None else None
        if name not in (chooser.choices if chooser is not None else {}):
            return parser
        parser = chooser.choices[name]


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's "unrecognized arguments" message, with the flags each unknown ``--flag`` may have meant."""
    import difflib

    known = [o for o in parser._option_string_actions if o.startswith("--")]
    hints = []
    for extra in extras:
        flag = extra.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        meant = [o for o in known if o.startswith(flag)] or difflib.get_close_matches(flag, known, n=3, cutoff=0.75)
        if meant:
            hints.append(f"{flag}: did you mean {' or '.join(meant)}?")
    return f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else "")


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but arguments no parser knows are reported by the subcommand that was chosen,
    with its usage line (argparse's own parse_args reports them with the top level's usage, which does not show
    the subcommand's flags); exit 2 as argparse does."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        chosen = subcommand_parser(parser, args)
        chosen.error(_unrecognized(chosen, extras))
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="oodguard", description="Out-of-distribution guard for image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    add_export_parser(sub)
    sub.add_parser("triton", help="run the local CPU tritonserver (from .venv-triton) on a model repository")
    add_evaluation_parsers(sub)
    add_serve_parser(sub)
    add_client_parsers(sub)
    add_harvest_parsers(sub)
    add_queue_command(sub)
    return parser


def add_train_parser(sub) -> None:
    """`oodguard train`: a backbone and linear head on a dataset."""
    train = sub.add_parser("train", help="train a backbone + linear head on a dataset",
                           description="Train a built-in or user backbone with a linear head. Writes checkpoint.pt "
                           "and training.json (classes, preprocessing, seeded train/calibration/test split) to --out.")
    train.add_argument("--backbone", help="lenet5 (default), resnet18_cifar, or package.module:factory; with --base: "
                       "the base run's")
    train.add_argument("--data", action="append", default=[], help="'digits', an IDX images file, a .npz (PATH.npz[#KEY], "
                       "e.g. what `labels import` writes) or a folder; repeatable (default: none; with --base the "
                       "base run's data)")
    train.add_argument("--base", type=Path, metavar="RUN", help="build on this run (a folder with training.json): its "
                       "data (by reference) and split are kept, its classes keep their indices, new classes are "
                       "appended by name, its preprocessing is kept")
    train.add_argument("--init-from", type=Path, metavar="CHECKPOINT", help="start from these weights (the head grows "
                       "for new classes) instead of training from scratch")
    train.add_argument("--balance", choices=["auto", "on", "off"], default="auto", help="class-balanced sampling; auto "
                       "(default): on when class counts differ by more than 10x")
    train.add_argument("--shift", type=int, default=0, metavar="PIXELS", help="augmentation: move each training image "
                       "by a random whole number of pixels, up to this many along each axis, every time it is drawn; "
                       "2 suits 28x28 digits and keeps a small new class from being memorised (default %(default)s: off)")
    train.add_argument("--outlier-data", action="append", default=[], metavar="SPEC",
                       help="images of none of the classes (e.g. what `labels import --not-relevant-out` wrote; any "
                       "dataset spec, labels ignored), trained as one extra class whose output the saved model drops: "
                       "its features learn where such inputs lie (open-set benchmark: a larger gain for open-quota "
                       "harvests); repeatable; with --base the base run's are kept (default: none)")
    train.add_argument("--classes", type=parse_labels, help="keep only these labels, e.g. 0-7 (relabelled 0..n-1)")
    train.add_argument("--out", type=Path, required=True, help="output folder")
    train.add_argument("--epochs", type=int, default=10, help="training epochs (default %(default)s)")
    train.add_argument("--batch-size", type=int, default=128, help="images per step (default %(default)s)")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the batches "
                       "(default %(default)s)")
    train.add_argument("--holdout", type=float, default=0.2,
                       help="fraction held out of training, halved into calibration and test splits "
                       "(default %(default)s)")
    train.add_argument("--input-shape", type=_ints, help="C,H,W for a backbone without an input_shape attribute")


def add_export_parser(sub) -> None:
    """`oodguard export`: a checkpoint (or the demo) with the fused OOD head into a repository."""
    export = sub.add_parser("export", help="export a checkpoint with the fused OOD head into a model repository",
                            description="Fit the OOD scores, export one ONNX graph (logits, features, scores), calibrate "
                            "95%-TPR thresholds on held-out ID data, and add the next version to the Triton model repository.")
    export.add_argument("--repository", type=Path, required=True, help="model repository folder")
    export.add_argument("--model", help="model name in the repository (default: 'digits' for --demo)")
    export.add_argument("--demo", choices=["digits"], help="train and export the digits demo, then print its evaluation")
    export.add_argument("--checkpoint", type=Path, help="checkpoint.pt (with training.json beside it, or give the flags below)")
    export.add_argument("--backbone", help="for a checkpoint without training.json: lenet5, resnet18_cifar or package.module:factory")
    export.add_argument("--bank-data", help="for a checkpoint without training.json: labelled ID training data")
    export.add_argument("--calibration-data", help="held-out ID data, disjoint from training (overrides training.json's split)")
    export.add_argument("--class-names", help="comma-separated class names (checkpoint without training.json)")
    export.add_argument("--input-shape", type=_ints, help="C,H,W (checkpoint without training.json)")
    export.add_argument("--mean", type=_floats, help="per-channel mean after scaling to [0,1]")
    export.add_argument("--std", type=_floats, help="per-channel std after scaling to [0,1]")
    export.add_argument("--bank-size", type=int, help="reduced bank size (class quotas water-filled; class-wise ProbCover "
                        "or a class-stratified random bank, whichever is not worse on validation); default: all training "
                        "samples")
    export.add_argument("--bank-method", choices=["auto", "probcover", "random"], default="auto",
                        help="how --bank-size picks each class's samples (default %(default)s: both, the better kept)")
    export.add_argument("--multi-layer", action="store_true",
                        help="also export multi-layer SISOM and SISOMe (sisom_ml, sisome_ml: gradient-weighted "
                        "activations of the backbone's named layers, e.g. LeNet-5 conv1, conv2, fc1 and the "
                        "penultimate). Default off: without it the graph has no such outputs, no backward pass and no "
                        "second bank. Cost: a backward pass through the backbone's tail in every call (ResNet-18 "
                        "32x32: about 2x the logits-only latency at batch 64) and distances to a bank of their own "
                        "(--multi-layer-bank-size); measured AUROC gain over the penultimate sisome on MNIST: within "
                        "noise, so use it where validation shows a gain (bench/multilayer_cost.py measures the cost)")
    export.add_argument("--multi-layer-bank-size", type=int, default=5000, metavar="N",
                        help="with --multi-layer: at most N samples in the multi-layer scores' own bank, a "
                        "class-stratified random draw from the export's bank (default %(default)s)")
    export.add_argument("--alpha", type=float, help="fixed SISOM sigmoid steepness (default: chosen on a log grid by the "
                        "worst-group validation AUROC)")
    export.add_argument("--knn-k", type=int, help="fixed k of the kNN score (default: chosen from 1,2,5,10,20,50 by the "
                        "worst-group validation AUROC; at most half the smallest class's bank count)")
    export.add_argument("--validation-ood", action="append", default=[], metavar="SPEC",
                        help="an OOD set for the export's choices (never a test set; repeatable): a group of its own "
                        "next to the synthetic near and far corruptions of training images (default: none)")
    export.add_argument("--new-class-holdouts", type=int, default=0, metavar="N",
                        help="choose the fused score on validation with a 'new' group: N classes held out in turn, "
                        "each by a classifier trained without it (the run's recipe from training.json; costs N "
                        "trainings), instead of the fixed new-class rule; opt-in while the signal is measured "
                        "(bench/new_class_signal.py) (default %(default)s: off)")
    export.add_argument("--fused-components", help="fixed components of the fused score, comma-separated (default: "
                        "knn_centred,rel_mahalanobis,maxlogit with fisher, the rule measured to flag new classes "
                        "(docs/methods.md#new-classes); without those scores, chosen on validation among subsets "
                        "of up to 3)")
    export.add_argument("--fused-combination", choices=["fisher", "min-p"],
                        help="fixed combination of the fused score's p-values (default: chosen with the components)")
    export.add_argument("--tpr", type=float, default=0.95, help="target TPR of the thresholds (default %(default)s)")
    export.add_argument("--max-batch-size", type=int, default=64, help="largest batch the Triton config and the "
                        "gateway accept (default %(default)s)")
    export.add_argument("--seed", type=int, default=0, help="seed of the bank, the validation OOD and the calibration "
                        "halves (default %(default)s)")
    export.add_argument("--epochs", type=int, default=30, help="training epochs for --demo (default %(default)s)")

    # listed here for `oodguard --help`; main() hands `oodguard triton ...` to oodguard.triton_local's own parser


def add_evaluation_parsers(sub) -> None:
    """`oodguard validate-repo` and `oodguard evaluate`: check a repository, measure a version."""
    validate = sub.add_parser("validate-repo", help="check a model repository against its ONNX files",
                              description="Parse every config into Triton's ModelConfig and check inputs, outputs, "
                              "dtypes and dims against each version's model.onnx and calibration.json. Exit 1 on any problem.")
    validate.add_argument("repository", type=Path)
    evaluate = sub.add_parser("evaluate", help="OOD metrics of an exported model version: ID test set vs OOD sets",
                              description="Score an in-distribution test set and OOD sets with the exported ONNX model "
                              "(what is served) and print AUROC, FPR@95TPR, AUPR-In, AUPR-Out and the realised TPR/FPR at "
                              "the calibrated thresholds, per score and OOD set, with near/far means. Datasets of another "
                              "shape are converted with the model's recorded preprocessing, and the conversion is reported.")
    evaluate.add_argument("--repository", type=Path, required=True, help="model repository folder (required)")
    evaluate.add_argument("--model", required=True, help="model name in the repository (required)")
    evaluate.add_argument("--version", type=int, help="default: the latest version")
    evaluate.add_argument("--id", required=True, dest="id_spec", help="in-distribution test set (any dataset spec)")
    evaluate.add_argument("--ood", action="append", default=[], metavar="NAME=PATH[:near|far|new]",
                          help="an OOD set; PATH is a dataset spec or synthetic:uniform|blobs[:COUNT]; the group: near or far (dataset "
                          "shift) or new (classes the model never learned); repeatable, "
                          "at least one (default: none)")
    evaluate.add_argument("--new-classes", type=parse_labels, metavar="LABELS",
                          help="a class holdout's unseen classes, e.g. 8-9: the --id dataset's images of these labels "
                          "become an OOD set of the 'new' group (classes the model never learned), beside near and "
                          "far; give the known ones with --classes (default: none)")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.add_argument("--plot", type=Path, metavar="DIR", help="also write DIR/scores.png: per score the histograms "
                          "(ID against each OOD set) with the calibrated threshold, and the ROC curves")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of synthetic sets (default %(default)s)")
    evaluate.add_argument("--classes", type=parse_labels, help="the labels of the ID set the model knows, e.g. 0-7: others "
                          "are left out of the ID set and reported (default: all; labels the model lacks are warned about)")


def add_serve_parser(sub) -> None:
    """`oodguard serve`: every flag generated from the typed settings (:func:`oodguard.serve.setting_flags.serve_flags`)."""
    serve = sub.add_parser("serve", help="run the gRPC gateway (embedded ONNX Runtime or Triton backend)",
                           description="Serve the model repository over gRPC (oodguard.v1.OODGuard + health + reflection): "
                           "classify, flag OOD inputs with the calibrated thresholds and queue them for relabeling. Every "
                           "flag also reads OODGUARD_<NAME> from the environment (e.g. OODGUARD_QUEUE_MAX_SIZE); flags win.")
    from oodguard.serve.setting_flags import serve_flags

    for flag, meta, text in serve_flags():  # generated from the Settings fields
        serve.add_argument(flag, metavar=meta, help=text.replace("%", "%%"))
