"""The `oodguard` command. Each subcommand imports its side lazily, so serving never imports torch."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from oodguard.queue_cli import add_queue_command, run_queue


def _classes(text: str) -> list[int]:
    """'0-7' or '0,1,2' or '0-3,7' → list of ints."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return out


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
    train.add_argument("--classes", type=_classes, help="keep only these labels, e.g. 0-7 (relabelled 0..n-1)")
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
                        help="add a 'new' validation group to the fused choice: N classes held out in turn, each by "
                        "a classifier trained without it (the run's recipe from training.json; costs N trainings); "
                        "opt-in while the signal is measured (bench/new_class_signal.py) (default %(default)s: off)")
    export.add_argument("--fused-components", help="fixed components of the fused score, comma-separated (default: "
                        "chosen on validation among subsets of up to 3 scores)")
    export.add_argument("--fused-combination", choices=["fisher", "min-p"],
                        help="fixed combination of the fused score's p-values (default: chosen with the components)")
    export.add_argument("--tpr", type=float, default=0.95, help="target TPR of the thresholds (default %(default)s)")
    export.add_argument("--max-batch-size", type=int, default=64, help="largest batch the Triton config and the "
                        "gateway accept (default %(default)s)")
    export.add_argument("--seed", type=int, default=0, help="seed of the bank, the validation OOD and the calibration "
                        "halves (default %(default)s)")
    export.add_argument("--epochs", type=int, default=30, help="training epochs for --demo (default %(default)s)")

    # listed here for `oodguard --help`; main() hands `oodguard triton ...` to oodguard.triton_local's own parser
    sub.add_parser("triton", help="run the local CPU tritonserver (from .venv-triton) on a model repository")
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
    evaluate.add_argument("--new-classes", type=_classes, metavar="LABELS",
                          help="a class holdout's unseen classes, e.g. 8-9: the --id dataset's images of these labels "
                          "become an OOD set of the 'new' group (classes the model never learned), beside near and "
                          "far; give the known ones with --classes (default: none)")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.add_argument("--plot", type=Path, metavar="DIR", help="also write DIR/scores.png: per score the histograms "
                          "(ID against each OOD set) with the calibrated threshold, and the ROC curves")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of synthetic sets (default %(default)s)")
    evaluate.add_argument("--classes", type=_classes, help="the labels of the ID set the model knows, e.g. 0-7: others "
                          "are left out of the ID set and reported (default: all; labels the model lacks are warned about)")

    serve = sub.add_parser("serve", help="run the gRPC gateway (embedded ONNX Runtime or Triton backend)",
                           description="Serve the model repository over gRPC (oodguard.v1.OODGuard + health + reflection): "
                           "classify, flag OOD inputs with the calibrated thresholds and queue them for relabeling. Every "
                           "flag also reads OODGUARD_<NAME> from the environment (e.g. OODGUARD_QUEUE_MAX_SIZE); flags win.")
    from oodguard.serve.settings import serve_flags

    for flag, meta, text in serve_flags():  # generated from the Settings fields
        serve.add_argument(flag, metavar=meta, help=text.replace("%", "%%"))
    _add_client_commands(sub)
    _add_harvest_commands(sub)
    add_queue_command(sub)
    return parser


class StrategyName(argparse.Action):
    """``harvest --strategy NAME``: its help lists the names of the strategy registry
    (:data:`oodguard.harvest.strategies.STRATEGIES`), so a new strategy shows in ``--help`` without a hand-kept
    list. The registry is read only when the help is shown, because importing it imports numpy, which building
    the parser for ``serve`` or ``queue`` must not pay for. An unknown NAME is refused by ``get_strategy`` when
    the command runs (exit 2, naming the registered ones), before the queue is opened."""

    @property
    def help(self) -> str:
        return (f"selection strategy, one of: {', '.join(strategy_names())} (`--param help` lists a strategy's "
                "parameters)")

    @help.setter
    def help(self, value) -> None:  # argparse.Action.__init__ assigns help=None: the property above answers instead
        pass

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)


def strategy_names() -> list[str]:
    """The registered harvest strategies' names, in registry order."""
    from oodguard.harvest.strategies import STRATEGIES

    return list(STRATEGIES)


def _add_harvest_commands(sub) -> None:
    harvest = sub.add_parser("harvest", help="select a label budget from the query queue and export it for relabeling",
                             description="Pick --budget pending records with an open-set active-learning strategy (from the "
                             "features, logits and scores the queue stores; no re-inference), write OUT/images/*.png, "
                             "OUT/manifest.jsonl and OUT/tasks.json (Label Studio import), and mark them sent so no later or "
                             "concurrent harvest selects them again.")
    harvest.add_argument("--queue", required=True, help="queue URL: sqlite:///PATH or redis://HOST:PORT/DB")
    harvest.add_argument("--strategy", required=True, metavar="NAME", action=StrategyName)
    harvest.add_argument("--budget", type=int, required=True, help="how many records to select")
    harvest.add_argument("--seed", type=int, default=0, help="seed of the strategy's random choices "
                         "(default %(default)s)")
    harvest.add_argument("--out", type=Path, required=True, help="new (or empty) output folder")
    harvest.add_argument("--repository", type=Path, default=Path("model_repository"),
                         help="model repository (class names, preprocessing, calibration scores) (default %(default)s)")
    harvest.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                         help="strategy parameter (numbers are parsed), repeatable; a KEY the strategy lacks is an error "
                         "that lists the strategy's parameters with their defaults (--param help lists them)")
    harvest.add_argument("--model", help="the model to harvest (required when the queue holds records of several)")
    harvest.add_argument("--labels", action="append", type=Path, default=[], metavar="FILE",
                         help="label export of an earlier harvest (what `labels import` reads), repeatable: the labeled "
                              "records' features, known and unknown ('not relevant', new classes), go to the strategy "
                              "(the (K+1)-way detector of lfosa, jsosal and open-quota) (default: none)")
    harvest.add_argument("--stale", choices=["rescore", "exclude"], default="rescore",
                         help="pending records of older versions of the model: rescore them with the newest version "
                              "in the pool (default; their stored input runs through that version's ONNX model) or "
                              "exclude them")
    harvest.add_argument("--dry-run", action="store_true",
                         help="select and write the outputs, but claim and mark nothing (compare strategies on one pool)")
    harvest.add_argument("--image-url-prefix", metavar="URL",
                         help="Label Studio task images as URL/images/<id>.png (a web or object-store root serving "
                              "the output folder); default: Label Studio's local-files form (see --local-files-root)")
    harvest.add_argument("--local-files-root", type=Path, metavar="DIR",
                         help="the LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT of the Label Studio server: task images become "
                              "/data/local-files/?d=<path below DIR> (default /: absolute paths)")

    labels = sub.add_parser("labels", help="bring relabeled records back as a training dataset")
    labels_sub = labels.add_subparsers(dest="labels_command", required=True, metavar="ACTION")
    imp = labels_sub.add_parser("import", help="Label Studio export (JSON, JSON-MIN, CSV) or CSV record_id,label → dataset .npz",
                                description="Join labels with the queue's records and write images, labels and class names "
                                "to an .npz that `oodguard train --data` reads. Reads Label Studio's JSON, JSON-MIN and CSV "
                                "exports of a project set up with the harvest's label_config.xml (labels must be its "
                                "choices: a known class, 'new class' with its name, or 'not relevant', which is left out) "
                                "and a plain CSV record_id,label (header optional); the format found is printed. New "
                                "classes (and a plain CSV's labels outside the model's classes) become classes of their "
                                "own (default) or one 'unknown' class.")
    imp.add_argument("file", type=Path, help="Label Studio export (JSON, JSON-MIN or CSV) or CSV record_id,label")
    imp.add_argument("--queue", required=True, help="queue URL the records were harvested from")
    imp.add_argument("--repository", type=Path, default=Path("model_repository"),
                     help="model repository holding the records' versions (class names) (default %(default)s)")
    imp.add_argument("--out", type=Path, required=True, help="dataset .npz to write")
    imp.add_argument("--unknown-policy", choices=["new-classes", "unknown"], default="new-classes",
                     help="new classes: each a class of its own (new-classes) or one 'unknown' class "
                     "(default %(default)s)")
    imp.add_argument("--not-relevant-out", type=Path, metavar="NPZ",
                     help="also write the images labeled 'not relevant' to this .npz (images, record_ids), for "
                          "`oodguard train --outlier-data` (default: they are left out; written, empty, when there "
                          "are none, and train then adds no extra class)")
    imp.add_argument("--model", help="the model whose records to import, when the export names records of several "
                     "(a dataset is of one model; default: the export's only model, an error when there are several)")
    imp.add_argument("--strict", action="store_true",
                     help="fail when the export names record ids that are not in the queue, or labels a record "
                     "differently in several annotations or rows (default: report; skip the missing ids, keep the "
                     "most recent label)")
    for name, text in (("push", "create a Label Studio project from a harvest folder (its label_config.xml) and import "
                                "its tasks.json"),
                       ("pull", "download a Label Studio project's export (what `labels import` reads)")):
        command = labels_sub.add_parser(name, help=text, description=text + ". The API token is read from the "
                                        "environment variable --token-env (Label Studio: Account & Settings → Access "
                                        "Token; start the server with --enable-legacy-api-token).")
        command.add_argument("--label-studio", required=True, metavar="URL", help="Label Studio's address, e.g. "
                             "http://127.0.0.1:8080")
        command.add_argument("--token-env", default="LABEL_STUDIO_API_KEY",
                             help="environment variable holding the API token (default %(default)s)")
        if name == "push":
            command.add_argument("harvest", type=Path, help="a harvest output folder")
            command.add_argument("--local-files-root", type=Path, default=Path("/"),
                                 help="the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, as given to harvest "
                                      "(default /)")
            command.add_argument("--title", help="project title (default: oodguard <harvest folder name>)")
        else:
            command.add_argument("--project", type=int, required=True, help="project id (printed by push)")
            command.add_argument("--format", choices=["JSON", "JSON_MIN", "CSV"], default="JSON",
                                 help="export format (default %(default)s)")
            command.add_argument("--out", type=Path, required=True, help="file to write")


def _strategy_params(pairs: list[str]) -> dict:
    from oodguard.harvest.strategies.base import param_value

    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {pair!r}: expected KEY=VALUE")
        params[key] = param_value(value)
    return params


def _run_harvest(args: argparse.Namespace) -> int:
    from oodguard.harvest.job import run_harvest

    from oodguard.harvest.export import ExportOptions

    from oodguard.harvest.strategies import get_strategy

    strategy = get_strategy(args.strategy)
    if args.param == ["help"]:
        print(f"{args.strategy} parameters (--param KEY=VALUE): {strategy.describe_params()}")
        return 0
    params = _strategy_params(args.param)
    strategy.check_params(params)  # before the queue is opened: nothing is claimed for a typo
    from oodguard.queues.factory import open_existing

    with open_existing(args.queue) as queue:
        run_harvest(queue, args.strategy, args.budget, args.out, args.repository, seed=args.seed,
                    params=params, model=args.model, stale=args.stale, dry_run=args.dry_run, labels=args.labels,
                    export=ExportOptions(image_url_prefix=args.image_url_prefix, local_files_root=args.local_files_root))
    return 0


def _run_labels(args: argparse.Namespace) -> int:
    if args.labels_command in ("push", "pull"):
        return _run_label_studio(args)
    from oodguard.harvest.labels import import_labels

    from oodguard.queues.factory import open_existing

    with open_existing(args.queue) as queue:
        summary = import_labels(args.file, queue, args.repository, args.out, args.unknown_policy, strict=args.strict,
                                not_relevant_out=args.not_relevant_out, model=args.model)
    print(summary.describe())
    return 0


def _run_label_studio(args: argparse.Namespace) -> int:
    from oodguard.harvest.label_studio_client import LabelStudioClient, LabelStudioError, push_harvest

    token = os.environ.get(args.token_env, "")
    if not token:
        raise ValueError(f"set {args.token_env} to a Label Studio API token (Account & Settings → Access Token)")
    client = LabelStudioClient(args.label_studio, token)
    try:
        if args.labels_command == "push":
            project = push_harvest(client, args.harvest, args.local_files_root, args.title)
            print(f"project {project}: {client.url}/projects/{project}/data (label there, then "
                  f"`oodguard labels pull --label-studio {client.url} --project {project} --out export.json`)")
            return 0
        data = client.export(args.project, args.format)
    except LabelStudioError as exc:
        raise ValueError(f"Label Studio: {exc}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out}: {len(data)} bytes, Label Studio {args.format} export of project {args.project}")
    return 0


def _add_client_commands(sub) -> None:
    """``predict`` and ``loadgen`` (oodguard.clients; imported only when run). Token: ``OODGUARD_TOKEN``."""
    predict = sub.add_parser("predict", help="classify image files with a running gateway",
                             description="Send each image file to the gateway and print its class, probability, OOD "
                             "decision and the scores that decided it. Bearer token from OODGUARD_TOKEN.")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files")
    loadgen = sub.add_parser("loadgen", help="drive a gateway with traffic and report throughput, latency, flagged share",
                             description="Send Predict requests from a dataset at a concurrency (and optional rate) for a "
                             "duration; report throughput, latency percentiles, errors by status and the flagged share. "
                             "Bearer token from OODGUARD_TOKEN.")
    loadgen.add_argument("--data", required=True, help="dataset spec ('digits', IDX, .npz, folder) or synthetic:uniform|blobs[:N]")
    loadgen.add_argument("--concurrency", type=int, default=4, help="requests in flight (default %(default)s)")
    loadgen.add_argument("--rate", type=float, default=0.0,
                         help="requests per second in all (default %(default)s: unlimited)")
    loadgen.add_argument("--duration", type=float, default=10.0, help="seconds, at most 3600 (default %(default)s)")
    loadgen.add_argument("--requests", type=int, default=0,
                         help="stop after N requests (default %(default)s: the duration decides)")
    loadgen.add_argument("--ood-fraction", type=float, default=0.0,
                         help="share of requests drawn from --ood-data (default %(default)s)")
    loadgen.add_argument("--ood-data", default="synthetic:uniform", help="OOD dataset spec (default %(default)s)")
    loadgen.add_argument("--batch-size", type=int, default=1, help="images per request (default %(default)s)")
    loadgen.add_argument("--seed", type=int, default=0, help="seed of the images drawn and of which requests are OOD "
                         "(default %(default)s)")
    loadgen.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    for command in (predict, loadgen):
        command.add_argument("--target", default="127.0.0.1:50051", help="gateway HOST:PORT (default %(default)s)")
        command.add_argument("--model", default="", help="model name (default: the server's)")
        command.add_argument("--timeout", type=float, default=10.0 if command is predict else 5.0,
                             help="deadline per call, s (default %(default)s)")
        command.add_argument("--tls-ca", metavar="FILE", help="root certificate (PEM) when the gateway serves TLS")
        command.add_argument("--json", action="store_true", help="print JSON")
    predict.add_argument("--top-k", type=int, default=3, help="top classes per image (default %(default)s)")


def _run_predict(args: argparse.Namespace) -> int:
    from oodguard.clients.predict import run

    return run(args)


def _run_loadgen(args: argparse.Namespace) -> int:
    from oodguard.clients.loadgen import run

    return run(args)


#: ``oodguard serve`` flags: each maps to the Settings field of the same name (dashes -> underscores).
def _run_evaluate(args: argparse.Namespace) -> int:
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


def _run_train(args: argparse.Namespace) -> int:
    from oodguard.export.training_job import run_training

    run_training(backbone=args.backbone, data=args.data, out_dir=args.out, classes=args.classes, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, seed=args.seed, holdout=args.holdout, input_shape=args.input_shape,
                 base=args.base, init_from=args.init_from, balance=args.balance, shift=args.shift,
                 outliers=args.outlier_data)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from oodguard.export import pipeline

    if args.demo:
        from oodguard.export.demo import format_table, run_demo

        if args.multi_layer:
            raise ValueError("--multi-layer is for --checkpoint exports; the digits demo exports the default scores")

        result = run_demo(args.repository, model_name=args.model or "digits", epochs=args.epochs, seed=args.seed)
        print("\nDigits demo (ID: test split of digits 0-7; AUROC and FPR@95TPR in %, higher score = more OOD):")
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
        spec = pipeline.spec_from_training(args.checkpoint, args.repository, args.model, **overrides)
        if args.calibration_data:
            from oodguard.datasets import load_dataset

            spec.calibration_data = load_dataset(args.calibration_data)
    else:
        spec = pipeline.spec_from_flags(args, **overrides)
    pipeline.export_model(spec)
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from oodguard.validate_repo import report

    return report(args.repository)


def _run_serve(args: argparse.Namespace) -> int:
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


COMMANDS = {"serve": _run_serve, "train": _run_train, "export": _run_export, "validate-repo": _run_validate, "evaluate": _run_evaluate,
            "predict": _run_predict, "loadgen": _run_loadgen, "harvest": _run_harvest, "labels": _run_labels,
            "queue": run_queue}


def watched_output(args: argparse.Namespace) -> tuple[Path, bool] | None:
    """(folder, recursive) that the command writes into, looked at before and after an interrupt so that the
    message says truthfully what was left: train writes two files into --out, export a version folder and the
    configs under --repository. None for the other commands."""
    if args.command == "train":
        return args.out, False
    if args.command == "export":
        return args.repository, True
    return None


def folder_state(folder: Path, recursive: bool) -> dict[str, tuple]:
    """What an interrupt is compared against: relative path → ("dir",) or ("file", size, mtime_ns) of the
    folder itself and what it holds (its direct entries, or everything below it when ``recursive``); an empty
    dict when it does not exist. Folders count by presence only: a temporary entry made and removed again
    changes a folder's mtime but leaves nothing behind."""
    state: dict[str, tuple] = {}
    if not folder.is_dir():
        return state
    for path in [folder, *(folder.rglob("*") if recursive else folder.iterdir())]:
        try:
            st = path.lstat()
        except OSError:  # removed meanwhile
            continue
        name = path.relative_to(folder).as_posix()
        state[name] = ("dir",) if path.is_dir() and not path.is_symlink() else ("file", st.st_size, st.st_mtime_ns)
    return state


def interrupted_message(args: argparse.Namespace, before: dict[str, tuple] | None) -> str:
    """The one line an interrupted command prints: for train and export, whether the output folder is as it
    was (compared with ``before``, its :func:`folder_state` when the command began; None: interrupted before
    the command began) or what changed in it, which may be partial."""
    head = f"oodguard {args.command}: interrupted"
    watched = watched_output(args)
    if watched is None:
        return head
    folder, recursive = watched
    after = folder_state(folder, recursive)
    before = after if before is None else before
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(name for name in set(before) & set(after) if before[name] != after[name])
    if not (added or removed or changed):
        return f"{head}; nothing was written ({folder} {'is unchanged' if after else 'was not created'})"

    def names(paths: list[str]) -> str:
        shown = [str(folder / p) if p != "." else str(folder) for p in paths[:4]]
        return ", ".join(shown) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")

    parts = [f"{label} {names(paths)}" for label, paths in (("new:", added), ("changed:", changed),
                                                            ("removed:", removed)) if paths]
    return f"{head} while writing its output, which may be partial; {'; '.join(parts)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["triton"]:  # its own parser: every option goes to it, --help included
        from oodguard.triton_local import main as triton_main

        return triton_main(argv[1:])
    args = parse_args(build_parser(), argv)
    before = None
    try:
        watched = watched_output(args)
        if watched is not None:
            before = folder_state(*watched)
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at exit
        return status
    except (ValueError, FileNotFoundError) as exc:
        print(f"oodguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`oodguard queue list | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was left, not a traceback; 128 + SIGINT as shells do
        print(interrupted_message(args, before), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
