"""`oodguard harvest`, `labels import` and `labels push/pull`: the loop's commands between the queue and Label
Studio."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


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


def add_harvest_parsers(sub) -> None:
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


def harvest_command(args: argparse.Namespace) -> int:
    from oodguard.harvest.job import run_harvest

    from oodguard.harvest.output_folder import ExportOptions

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


def labels_command(args: argparse.Namespace) -> int:
    if args.labels_command in ("push", "pull"):
        return label_studio_command(args)
    from oodguard.harvest.label_import import import_labels

    from oodguard.queues.factory import open_existing

    with open_existing(args.queue) as queue:
        summary = import_labels(args.file, queue, args.repository, args.out, args.unknown_policy, strict=args.strict,
                                not_relevant_out=args.not_relevant_out, model=args.model)
    print(summary.describe())
    return 0


def label_studio_command(args: argparse.Namespace) -> int:
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
