"""The command line: a thin layer over importable functions.

Heavy imports (torch, mmdet, ray) happen inside the subcommands that need them, so
``plan``, ``ls`` and ``--help`` start fast.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from harness.suite.yamlio import SuiteError


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _classes_line(ds: dict) -> str:
    """A dataset's class count and first names, where they are known without importing a
    backend (the suite's list, synthetic data, COCO categories, image folders)."""
    from harness.data.formats import dataset_format
    from harness.registry import preview
    fmt = dataset_format(ds)
    if not ds.get("classes") and fmt.classes_from_library:
        return f"the {ds['format']} format's own classes"
    try:
        names = fmt.classes(ds)
    except (OSError, ValueError, KeyError) as exc:
        return f"classes not readable yet ({type(exc).__name__})"
    return f"{len(names)} classes ({preview(names)})"


def _cmd_plan(args: argparse.Namespace) -> int:
    from harness.suite.load import load_suite
    from harness.run.session import pending_trials  # noqa: F401 - imports no ray at module level

    suite = load_suite(args.suite, args.output_root, fetch=False)     # offline and read-only: downloads nothing
    teachers, students = pending_trials(suite) if Path(suite.output).exists() else (
        suite.teacher_trials(), suite.student_trials())
    todo = {t.trial_id for t in teachers + students}
    res = suite.doc["resources"]
    print(f"suite '{suite.name}' ({suite.file}): {len(suite.trials)} trials, "
          f"{len(suite.trials) - len(todo)} already done; per trial {res['cpu']} CPU, {res['gpu']} GPU; "
          f"results -> {suite.output}" + (f"; storage -> {suite.doc['storage']}" if suite.doc.get("storage") else ""))
    for ds in suite.datasets():
        print(f"  dataset {ds['name']} ({ds['format']}, {ds['root']}): {_classes_line(ds)}")
    for name, uri in suite.pending_downloads.items():
        print(f"  teacher {name}: checkpoint {uri} is not downloaded yet; run downloads it (plan never does), "
              f"and the ids of its trials, which its content is part of, are known then")
    cm = suite.doc["baselines"]
    if cm["compute_matched"]:
        print(f"  then compute-matched baselines: per distilled trial, up to {cm['attempts']} stretched "
              f"student-alone trial(s) until within {cm['tolerance']:.0%} of its device-hours")
    if suite.doc.get("tuned"):
        print("  tuned by a search: " + ", ".join(f"{k} (search {v})" for k, v in suite.doc["tuned"].items()))
    from harness.run.preflight import check_data
    check_data(suite, show=True)        # (cached for the run; synthetic data not written yet: checked by run)
    width = max([len("trial")] + [len(t.name) for t in suite.trials]) + 2
    print(f"{'':2}{'trial':<{width}}{'id':<14}{'params'}")
    for t in suite.trials:
        mark = " " if t.trial_id in todo else "✓"
        print(f"{mark:2}{t.name:<{width}}{t.trial_id:<14}{_params(t.params)}")
    return 0


def _checked_suite(args: argparse.Namespace) -> "object":
    """The suite of ``run`` and ``tune``, with the checks that need no backend: the schema,
    the ``type:`` names against the registries, (locally) the per-trial resources. The rest
    (:func:`_prepare_data_and_models`) runs while Ray starts."""
    from harness.suite.load import load_suite

    suite = load_suite(args.suite, args.output_root)   # every suite error is raised here, before anything runs
    from harness.run.preflight import check_types
    check_types(suite)                  # every `type:` a registered class, before any config is built
    from harness.run.preflight import check_room
    check_room(suite)                   # a disk already full: refused before Ray starts
    storage = suite.doc.get("storage")
    if storage and "://" in storage and not storage.startswith("file://"):
        from harness.store.storage import StorageError, probe
        try:
            probe(storage)               # a store that does not answer: said in seconds, before Ray starts
        except StorageError as exc:
            raise SuiteError(f"{suite.where.get('storage', suite.file)}: storage: {exc}") from None
    if args.address or os.environ.get("RAY_ADDRESS"):   # a cluster that does not answer: say so now
        from harness.run.session import probe_address
        probe_address(args.address or os.environ["RAY_ADDRESS"])
    else:
        from harness.run.session import check_resources, local_capacity
        gpus = any(float(t.resources.get("gpu") or 0) > 0 for t in suite.trials)
        check_resources(suite, local_capacity(args.num_cpus, count_gpus=gpus))   # a cluster's: once joined
    return suite


def _prepare_data_and_models(suite: "object", args: argparse.Namespace) -> None:
    """With the run lock held, before any trial (while Ray starts): mmcv's ops on every
    device kind the trials ask for, datasets written (synthetic) and readable, every
    model built."""
    from harness.data.formats import dataset_format, ensure_dataset
    from harness.run.devices import check_devices
    from harness.run.preflight import check_data, check_pretrained, preflight

    check_devices(suite)                # mmcv's ops run on every device kind the trials ask for

    for ds in suite.datasets():
        ensure_dataset(ds)
        try:
            dataset_format(ds).check_classes(ds)
        except ValueError as exc:
            raise SuiteError(f"{suite.file}: datasets.{ds['name']}: {exc}") from None
    check_data(suite)                   # annotations, images, boxes, labels: errors stop the run here
    nets = preflight(suite)
    check_pretrained(suite, nets)       # every pretrained backbone had, read weights-only, and fitting


def _cmd_run(args: argparse.Namespace) -> int:
    suite = _checked_suite(args)
    from harness.run.runlock import run_lock

    with run_lock(suite.output, wait=args.wait):
        from harness.store.results import remove_stale_temporaries
        from harness.run.matrix import run_suite
        from harness.run.session import Interrupted

        remove_stale_temporaries(suite.output)     # a killed run's half-written files; we hold the lock
        start = time.perf_counter()
        try:
            # the data and every model are checked while Ray starts, before any trial
            summary = run_suite(suite, address=args.address, resume=not args.restart, num_cpus=args.num_cpus,
                                verbose=args.verbose, dry_run=args.dry_run,
                                prepare=lambda: _prepare_data_and_models(suite, args))
            if not args.dry_run:        # the rounds a seed rule and compute-matched baselines add
                from harness.run.matched import matched_rounds
                from harness.run.seeds import seed_rounds
                from harness.suite.load import load_suite
                again = dict(address=args.address, num_cpus=args.num_cpus, verbose=args.verbose)
                suite = seed_rounds(suite, summary, lambda plan: load_suite(args.suite, args.output_root,
                                                                            seeds_for=plan), **again)
                matched_rounds(suite, summary, **again)
        except Interrupted as exc:
            summary = exc.args[1] if len(exc.args) > 1 else {"trials": [], "skipped": 0, "interrupted": []}
            done = summary.get("finished", sum(not t["error"] for t in summary["trials"]))
            went = "gone through" if args.dry_run else "finished"
            print(f"\nstopped by {exc.args[0]}: {done} trial(s) {went} and kept, "
                  f"{len(summary['interrupted'])} interrupted (marked 'interrupted'; the next run redoes them), "
                  f"{summary['skipped']} already done before. Run the same command again to continue.",
                  file=sys.stderr)
            return 130
        failed = [t for t in summary["trials"] if t["error"]]
        retried = sum(t.get("retries", 0) > 0 for t in summary["trials"])
        print(f"\n{len(summary['trials'])} trial(s) run: {len(summary['trials']) - len(failed)} finished, "
              f"{len(failed)} failed, {retried} retried, {summary['skipped']} skipped (already done); "
              f"{time.perf_counter() - start:.0f} s; results: {summary['results']}\n")
        if args.dry_run:
            print("dry run: every trial was a no-op through Ray; its rows say status 'dry_run' and no "
                  "leaderboard counts them; a real run redoes them")
            return 1 if failed else 0
        from harness.store.html_report import write_report     # (pandas, scipy: after the run, not before)
        from harness.store.report import format_report
        from harness.store.results import read_results, suite_record
        df, record = read_results(suite.output), suite_record(suite.output)
        md, page = write_report(df, suite.output, record=record)
        print(format_report(df, **record))
        print(f"\nwritten: {md}, {page}")
        return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from harness.store.html_report import write_report
    from harness.store.report import format_report, leaderboard
    from harness.store.results import read_results, suite_record

    df = read_results(args.results, current_only=not args.all)
    target = Path(args.results)
    where = target if target.is_dir() else target.parent
    _confined([args.csv, where / "leaderboard.md", where / "report.html"] if args.csv
              else [where / "leaderboard.md", where / "report.html"], args)
    if args.csv:
        leaderboard(df, args.best, args.interval, args.olympic).to_csv(args.csv, index=False)
    record = suite_record(where)
    md, page = write_report(df, where, best=args.best, interval=args.interval, trim=args.olympic, record=record)
    print(format_report(df, best=args.best, interval=args.interval, trim=args.olympic, **record))
    print(f"\nwritten: {md}, {page}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    suite = _checked_suite(args)
    if not suite.doc.get("search"):
        raise SuiteError(f"{suite.file}: no 'search' block; harness tune needs one (see docs/suite-schema.md, Search)")
    from harness.run.runlock import run_lock

    with run_lock(suite.output, wait=args.wait):
        from harness.run.search import run_search
        summary = run_search(suite, address=args.address, num_cpus=args.num_cpus, verbose=args.verbose,
                             prepare=lambda: _prepare_data_and_models(suite, args))
    print(f"\nsearch {summary['search_id']}:")
    for cell in summary["cells"]:
        if cell.get("error"):
            print(f"  {cell['cell']}: {cell['error']}")
            continue
        best = cell["best"]
        shown = "none finished" if best is None else f"best {best['config']} scored {best['score']:.4f}"
        print(f"  {cell['cell']}: {cell['trials']} configuration(s), {cell['pruned']} stopped early; {shown}")
    for written in summary["suites"]:
        lacking = f" (without {', '.join(written['missing'])}: its search found no configuration)" \
            if written["missing"] else ""
        print(f"  re-evaluate {written['pair'][0]}/{written['pair'][1]}->{written['pair'][2]} on fresh seeds"
              f"{lacking}: python -m harness run {written['file']}")
    return 0 if summary["suites"] and all(c.get("best") for c in summary["cells"]) else 1


def _cmd_schema(args: argparse.Namespace) -> int:
    from harness.suite.reference import reference

    print(reference())
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    from harness import catalog

    for title, reg, fields in (("tasks", catalog.TASKS, ("scope",)),
                               ("methods", catalog.METHODS, ("tasks",)),
                               ("architectures", catalog.ARCHS, ("task", "family")),
                               ("dataset formats", catalog.DATASET_FORMATS, ("task", "metric")),
                               ("metrics", catalog.METRICS, ("task", "primary"))):
        entries = list(reg)
        metas = [" ".join(f"{f}={'/'.join(e[f]) if isinstance(e[f], tuple) else e[f]}" for f in fields)
                 for e in entries]
        # columns as wide as their longest entry, two spaces apart (names never run together)
        name_w = max((len(e.name) for e in entries), default=0) + 2
        meta_w = max((len(m) for m in metas), default=0) + 2
        print(f"{title}:")
        for e, meta in zip(entries, metas):
            params = e.get("params")
            extra = f"  params: {_params(params)}" if params else ""
            print(f"  {e.name:<{name_w}}{meta:<{meta_w}}{e.doc}{extra}")
            for family, over in (e.get("family_params") or {}).items():     # per-family defaults, if any
                print(f"  {'':<{name_w}}{'':<{meta_w}}  with a {family} student: {_params(over)}")
    papers = list(catalog.PAPER_RESULTS)
    name_w = max(len(e.name) for e in papers) + 2
    print("papers' results (set beside a cell trained in the same setup), by source:")
    for source in dict.fromkeys(e["source"] for e in papers):
        print(f"  {source}")
        for e in (e for e in papers if e["source"] == source):
            print(f"    {e.name:<{name_w}}{e['metric']} {e['baseline']:g} -> {e['distilled']:g}")
    return 0


def _confined(paths: list, args: argparse.Namespace) -> None:
    """Refuse (SuiteError, exit 2) a file the CLI would write outside the allowed roots: the
    working directory, $KD_HARNESS_OUTPUT_ROOT, --output-root (links followed)."""
    from harness.suite.paths import allowed_roots, outside
    roots = allowed_roots(args.output_root)
    for path in paths:
        # only the path written: a folder written into, with the links directly in it; a
        # file (or a folder still to be made) and where it resolves, not its siblings (an
        # ordinary data/coco -> /datasets/coco beside it is none of this write's business)
        if Path(path).is_dir():
            why = outside(path, roots)
        else:
            why = outside(Path(path).parent, roots, links_inside=False) or \
                (outside(path, roots, links_inside=False) if Path(path).is_symlink() else None)
        if why:
            raise SuiteError(f"{args.command}: will not write {path}: {why}")


def _cmd_synth(args: argparse.Namespace) -> int:
    from harness import catalog
    from harness.registry import import_target

    _confined([args.out], args)

    entry = catalog.DATASET_FORMATS.get(args.format)
    kwargs = {k: v for k, v in dict(train_images=args.train_images, val_images=args.val_images,
                                    image_size=args.image_size, seed=args.seed).items() if v is not None}
    root = import_target(entry["synth"])(args.out, **kwargs)
    print(f"wrote a synthetic {args.format}-layout dataset to {root}")
    return 0


def _int_within(low: int | None, high: int | None = None, what: str = "") -> Any:
    """An argparse type: an integer within [low, high]; out of range is argparse's usage
    error naming the flag (exit 2), before anything starts."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            valid = f"at least {low}" if high is None else f"{low} to {high}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: valid {valid}{what}")
        return value
    return integer


def _synth_int(key: str) -> Any:
    """The bounds the suite schema's ``synth:`` block gives ``key`` (one source for both)."""
    from harness.suite.schema import Synth, int_bounds
    return _int_within(*int_bounds(Synth, key), ", as in a suite's synth: block")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness", description=(
        "Benchmark knowledge-distillation methods: suites of datasets x (teacher, student) pairs x "
        "methods x seeds, scheduled on Ray Tune, results in a Parquet store."))
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="validate a suite, run its pending trials on Ray Tune, print the leaderboard")
    r.add_argument("suite", help="suite YAML file, e.g. suites/demo.yaml")
    r.add_argument("--address", default=None, help="address of an existing Ray cluster (default: start one locally)")
    r.add_argument("--num-cpus", type=_int_within(1), default=None, help="CPUs of the local Ray instance (default: all)")
    r.add_argument("--restart", action="store_true", help="redo finished trials instead of skipping them")
    r.add_argument("--verbose", action="store_true", help="show the trials' own logs (always kept in their directories)")
    r.add_argument("--wait", action="store_true", help="if another run holds this output, wait for it instead of leaving")
    r.add_argument("--dry-run", action="store_true", help="run every trial as an instant no-op through the same Ray "
                                                          "path (scheduling, placement, rows marked 'dry_run')")
    r.set_defaults(func=_cmd_run)
    pl = sub.add_parser("plan", help="validate a suite and print its trial matrix (runs nothing)")
    pl.add_argument("suite")
    pl.set_defaults(func=_cmd_plan)
    tu = sub.add_parser("tune", help="run the suite's hyperparameter search ('search:' block) on Ray Tune")
    tu.add_argument("suite")
    tu.add_argument("--address", default=None, help="address of an existing Ray cluster")
    tu.add_argument("--num-cpus", type=_int_within(1), default=None, help="CPUs of the local Ray instance (default: all)")
    tu.add_argument("--verbose", action="store_true", help="show the trials' own logs")
    tu.add_argument("--wait", action="store_true", help="wait for another run holding this output")
    tu.set_defaults(func=_cmd_tune)
    for sp in (r, pl, tu):
        sp.add_argument("--output-root", action="append", default=[], metavar="DIR",
                        help="also allow the suite to write under DIR (besides the working directory and "
                             "$KD_HARNESS_OUTPUT_ROOT); repeatable")
        sp.add_argument("--allow-python-configs", action="store_true",
                        help="let model entries name a .py config from disk (reading one runs its code; bundled "
                             "mmdet:: / mmseg:: configs and YAML / JSON files need no flag)")
    sc = sub.add_parser("schema", help="print the reference of every suite key (Markdown)")
    sc.set_defaults(func=_cmd_schema)
    ls = sub.add_parser("ls", help="list registered methods, architectures, dataset formats and metrics")
    ls.set_defaults(func=_cmd_ls)
    rep = sub.add_parser("report", help="print the leaderboard of a results directory or Parquet file")
    rep.add_argument("results", help="e.g. results/demo")
    rep.add_argument("--csv", default=None, help="also write the leaderboard to this CSV file")
    rep.add_argument("--best", action="store_true",
                     help="best-epoch values instead of last-epoch ones (the table's title says which)")
    rep.add_argument("--all", action="store_true",
                     help="include rows of trials that are no longer in the suite as last run (never pooled by default)")
    rep.add_argument("--interval", choices=("t", "bootstrap"), default="t",
                     help="95%% intervals by Student's t (default) or a bootstrap of the mean (10,000 resamples)")
    rep.add_argument("--olympic", action="store_true",
                     help="MLPerf's olympic scoring: drop each cell's best and worst seed (for gains: the best and "
                          "worst paired differences) before averaging")
    rep.add_argument("--output-root", action="append", default=[], metavar="DIR",
                     help="also allow writing under DIR (the report beside the results, --csv)")
    rep.set_defaults(func=_cmd_report)
    data = sub.add_parser("data", help="dataset utilities")
    dsub = data.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write a synthetic dataset in a real on-disk layout")
    s.add_argument("format", help="dataset format, e.g. coco")
    s.add_argument("--out", required=True, help="dataset root to write")
    for key in ("train_images", "val_images", "image_size", "seed"):
        s.add_argument(f"--{key.replace('_', '-')}", type=_synth_int(key), default=None)
    s.add_argument("--output-root", action="append", default=[], metavar="DIR",
                   help="also allow writing under DIR (besides the working directory and $KD_HARNESS_OUTPUT_ROOT)")
    s.set_defaults(func=_cmd_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "allow_python_configs", False):
        from harness.suite.zoo import ALLOW_PYTHON_ENV
        os.environ[ALLOW_PYTHON_ENV] = "1"        # for this process and the trials it starts
    if args.command in ("run", "tune"):
        from harness.run.weights import harden_loading
        said = harden_loading()           # every torch.load weights-only, here and in the trials
        if said:
            print(f"warning: {said}", file=sys.stderr)
    from harness.store.results import NewerSchema, NotResults
    from harness.run.runlock import Busy
    from harness.run.session import Unreachable
    try:
        return int(args.func(args) or 0)
    except (SuiteError, FileNotFoundError, KeyError, Busy, NewerSchema, NotResults, Unreachable) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        if exc.__cause__ is not None:     # e.g. PyTorch's own page on a checkpoint it would not load
            if getattr(args, "verbose", False):
                import traceback
                traceback.print_exception(exc.__cause__, file=sys.stderr)
            elif args.command in ("run", "tune"):
                print("(--verbose shows the underlying error in full)", file=sys.stderr)
        return 2
    except BrokenPipeError:            # output piped into `head` and the like (before OSError: a subclass)
        sys.stderr.close()
        return 0
    except OSError as exc:             # a full disk, a read-only store: say so, keep what is written
        print(f"error: {exc.strerror or exc} ({exc.filename or 'while writing results'}); finished trials' rows "
              f"are kept and a later run continues from them", file=sys.stderr)
        return 1
