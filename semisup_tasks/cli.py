"""The ``semisup`` command (also ``python -m semisup_tasks``): imports, stages, report.

Every stage prints logs to stderr and writes its small JSON result document to ``--result-file``
(or stdout when absent); the Airflow stage operator reads that document and pushes it to XCom.
A mistake a user can fix exits with status 2 and one sentence on stderr.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from .config import DEFAULT_STORE, ConfigError
from .store import Store, StoreError

USER_ERROR = 2


def _store_arg(p: argparse.ArgumentParser) -> None:
    default = os.environ.get("SEMISUP_STORE") or DEFAULT_STORE
    p.add_argument("--store", default=default, help=f"store root URI (default $SEMISUP_STORE or {DEFAULT_STORE})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semisup", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logs from semisup (the AWS SDK's and urllib3's stay at WARNING: theirs "
                             "carry request headers, signatures and session tokens)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-imagefolder", help="import a labeled ImageFolder tree as a dataset version")
    _store_arg(p)
    p.add_argument("--name", required=True)
    p.add_argument("--root", required=True, help="local folder or s3:// prefix with one subfolder per class")
    p.add_argument("--version", default=None, help="dataset version (default: the next vN)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("import-drop", help="import every image under a folder as one unlabeled drop")
    _store_arg(p)
    p.add_argument("--drop-id", required=True)
    p.add_argument("--source", required=True,
                   help="local folder or s3:// prefix: images, WebDataset .tar shards or img2dataset .parquet shards")

    p = sub.add_parser("import-weak-labels", help="import a drop's weak labels (noisy tags such as hashtags) from a "
                                                  "path,label CSV, for the semi-weakly supervised teacher "
                                                  "(weak_pretrain_epochs)")
    _store_arg(p)
    p.add_argument("--drop-id", required=True, help="a committed drop")
    p.add_argument("--csv", required=True,
                   help="local CSV file with the header path,label: the image's path inside the drop as imported, "
                        "its class name (empty: no tag); images it does not name get no tag")
    p.add_argument("--dataset", required=True, help="the labeled dataset whose class names the labels are")
    p.add_argument("--dataset-version", default="latest", help="its version (default: latest)")

    p = sub.add_parser("ingest", help="register what landed under LANDING/<YYYY-MM-DD>/ as drop <prefix><YYYY-MM-DD> "
                                      "(idempotent; a day with nothing landed is not an error)")
    _store_arg(p)
    p.add_argument("--date", required=True, help="the landing day, YYYY-MM-DD")
    p.add_argument("--landing", default="landing",
                   help="landing root: a prefix inside the store (default: landing) or a file:// or s3:// URI")
    p.add_argument("--drop-prefix", default="", help="put before the date to make the drop id (default: none)")

    p = sub.add_parser("demo-data", help="build the MNIST demo dataset and drops (no download)")
    _store_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weak-noise", type=float, default=None, metavar="NOISE",
                   help="also write weak labels for the drops, simulated from their true labels with this fraction "
                        "of wrong tags (for weak_pretrain_epochs)")

    p = sub.add_parser("stage", help="run one pipeline stage (what the Airflow operator calls)")
    p.add_argument("name", help="stage name, e.g. train-teacher, score, select")
    _store_arg(p)
    p.add_argument("--run-id", required=True)
    p.add_argument("--params-json", default="{}", help="pipeline params as a JSON object")
    p.add_argument("--shards", nargs="*", default=None, help="shard keys (score stage)")
    p.add_argument("--group", type=int, default=None,
                   help="index of one of the plan's shard groups (score and filter stages)")
    p.add_argument("--result-file", default=None)

    p = sub.add_parser("run", help="run the whole pipeline in this process, without Airflow")
    _store_arg(p)
    p.add_argument("--run-id", required=True)
    p.add_argument("--params-json", default="{}")

    p = sub.add_parser("experiments", help="the paper's study in miniature: a grid of settings x seeds, aggregated "
                                           "into REPRODUCTION.md and plots (what the semisup_experiments DAG runs)")
    exp = p.add_subparsers(dest="experiments_command", required=True)
    for action, text in (("run", "run (or resume) a whole experiment in this process, then aggregate it"),
                         ("aggregate", "aggregate the finished cells again (results.json, plots, REPRODUCTION.md)"),
                         ("export", "copy REPRODUCTION.md, results.json and the plots to a local folder")):
        e = exp.add_parser(action, help=text)
        _store_arg(e)
        e.add_argument("--experiment", required=True, help="experiment id: experiments/<id>/ in the store")
        if action == "run":
            e.add_argument("--grid", default="default",
                           help="a named grid (default: ~1 h on 2 CPU cores; ci: minutes; full: for GPUs; "
                                "noisy_student: soft labels and mixed batches) or a JSON grid file")
        if action in ("run", "aggregate"):
            e.add_argument("--notes", default=None,
                           help="JSON file {finding id: why it does not agree}, shown in REPRODUCTION.md")
        if action in ("run", "export"):
            e.add_argument("--to", default=None if action == "run" else ".", dest="export_to",
                           help="local folder to copy REPRODUCTION.md, results.json and plots/ into")

    p = sub.add_parser("report", help="print a run's report")
    _store_arg(p)
    p.add_argument("--run", default="latest", help="run id, or 'latest'")
    p.add_argument("--format", choices=["json", "table"], default="table")

    p = sub.add_parser("models", help="the model registry: versions, model cards, the champion and its history")
    models = p.add_subparsers(dest="models_command", required=True)
    for action, text in (("list", "list a model's versions (* marks the champion)"),
                         ("show", "print a version's model card as JSON"),
                         ("history", "print every move of the champion, oldest first"),
                         ("promote", "make a version the champion by hand (bypasses the gate; recorded as manual)"),
                         ("rollback", "make the previous champion the champion again")):
        m = models.add_parser(action, help=text)
        _store_arg(m)
        # a model name is a dataset's name (one label space, one champion); with one model in the store
        # there is nothing to choose, so the default is that one
        m.add_argument("--name", default=None, help="model name, the dataset's name (default: the store's only model)")
        if action in ("show", "promote"):
            m.add_argument("--version", required=action == "promote", default=None,
                           help="version, e.g. v3" + (" (default: the champion)" if action == "show" else ""))
        if action in ("promote", "rollback"):
            m.add_argument("--reason", default=None, help="why, recorded in the history")
    return parser


def _params(text: str, what: str = "--params-json") -> dict:
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON ({exc.msg} at character {exc.pos}); pass a JSON "
                          "object like '{\"k\": 100}'.") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{what} must be a JSON object like '{{\"k\": 100}}', got {text!r}.")
    return params


def _emit(result: dict, result_file: str | None) -> None:
    text = json.dumps(result, sort_keys=True)
    if result_file:
        Path(result_file).write_text(text)
    else:  # one write: a container runtime interleaving stderr cannot split the line
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


#: loggers whose DEBUG (and some INFO) records carry credentials: request headers with the access key
#: id, the signature and the session token; they never log below WARNING, whatever the level asked
CREDENTIAL_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    for name in ("semisup", "semisup_tasks"):  # our loggers: semisup.stages, semisup_tasks.datasets, ...
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _sentence(exc: Exception) -> str:
    """One line, one sentence: what went wrong and what to do about it."""
    if isinstance(exc, OSError):
        what = f"Cannot use {exc.filename}" if exc.filename else "A file operation failed"
        text = f"{what} ({exc.strerror or exc}); check that the path exists and that this user may read and write it."
    else:
        text = str(exc)
    return " ".join(text.split())  # a message from a library may span lines; the error is one line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        store = Store.from_uri(args.store)
        # every command but reading a report or the registry writes: a read-only store fails before any work
        store.check(write=not (args.command == "report" or (args.command == "models" and args.models_command in
                                                              ("list", "show", "history"))))
        if args.command == "import-imagefolder":
            from .datasets import import_imagefolder

            _emit(import_imagefolder(store, args.name, args.root, version=args.version,
                                     val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                     seed=args.seed), None)
        elif args.command == "import-drop":
            from .datasets import import_drop

            _emit(import_drop(store, args.drop_id, args.source), None)
        elif args.command == "import-weak-labels":
            from .datasets import import_weak_labels, load_dataset_manifest

            classes = load_dataset_manifest(store, args.dataset, args.dataset_version)["classes"]
            _emit(import_weak_labels(store, args.drop_id, args.csv, classes), None)
        elif args.command == "ingest":
            from .ingest import ingest

            _emit(ingest(store, args.date, landing=args.landing, drop_prefix=args.drop_prefix), None)
        elif args.command == "demo-data":
            from .demo import build_demo, build_weak_labels

            summary = build_demo(store, seed=args.seed)
            if args.weak_noise is not None:
                summary["weak_labels"] = build_weak_labels(store, noise=args.weak_noise, seed=args.seed)
            _emit(summary, None)
        elif args.command == "stage":
            from .distributed import init_from_env, is_main
            from .stages import run_stage

            init_from_env()  # under torchrun: join the other processes; otherwise nothing
            result = run_stage(args.name, store, args.run_id, _params(args.params_json), shards=args.shards,
                               group=args.group)
            if is_main():  # one result document, from rank 0
                _emit(result, args.result_file)
        elif args.command == "run":
            from .stages import run_pipeline

            _emit(run_pipeline(store, args.run_id, _params(args.params_json)), None)
        elif args.command == "report":
            from .report import load_metrics, render_table

            metrics = load_metrics(store, args.run)
            print(json.dumps(metrics, indent=2, sort_keys=True) if args.format == "json" else render_table(metrics))
        elif args.command == "experiments":
            _experiments(store, args)
        elif args.command == "models":
            from .registry import models_command

            print(models_command(store, args.models_command, name=args.name,
                                 version=getattr(args, "version", None), reason=getattr(args, "reason", None)))
    except (ConfigError, StoreError, OSError) as exc:  # OSError: missing or unreadable local files
        line = f"semisup: error: {_sentence(exc)}"
        print(line, file=sys.stderr)
        _termination_message(line)
        return USER_ERROR
    return 0


def _experiments(store: Store, args: argparse.Namespace) -> None:
    from . import experiments

    notes = None
    if getattr(args, "notes", None):
        notes = _params(Path(args.notes).read_text(encoding="utf-8"), "--notes")
    if args.experiments_command == "run":
        result = experiments.run_experiment(store, args.experiment, args.grid, notes=notes)
    elif args.experiments_command == "aggregate":
        result = experiments.aggregate(store, args.experiment, notes=notes)
    else:
        result = {}
    folder = getattr(args, "export_to", None)  # run: only with --to; export: always
    if folder:
        result["exported"] = experiments.export(store, args.experiment, folder)
    _emit(result, None)


TERMINATION_LOG = Path("/dev/termination-log")


def _termination_message(text: str) -> None:
    """In a Kubernetes pod, the error sentence also goes where the pod's status (and Airflow) read it."""
    try:
        if TERMINATION_LOG.exists():
            TERMINATION_LOG.write_text(text)
    except OSError:
        pass  # not in a pod, or not writable: stderr has it anyway


def run() -> None:
    """Process entry point (``semisup``, ``python -m semisup_tasks``).

    After Python's own exit handlers it ends the process without C++ static destruction: Arrow's
    native thread pools can otherwise abort an interpreter that already finished its work
    ("terminate called without an active exception", apache/arrow#34314), turning a stage that
    wrote all its outputs into a failed task.
    """
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
