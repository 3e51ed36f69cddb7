"""The ``sieve`` command line. Every command exits 0 on success and 2 on bad input."""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import threading
import time

from storage.errors import BadInput
from storage.location import is_remote, store_failure
from storage.store import Store

EXIT_BAD_INPUT = 2
QUERY_ROWS = 1000  # rows `sieve query` prints unless --limit says otherwise


def _row_limit(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0: all rows)")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit code 2)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        store = Store(args.store) if args.store else Store.default()
        store.check_reachable()
        try:
            return args.command(args, store)
        except BadInput:
            if is_remote(store.root):  # "missing file" may be a store that went away: say so
                store.check_reachable()
            raise
        except Exception as exc:  # a URL store that stops answering is not a bug of Sieve's
            reason = store_failure(exc) if is_remote(store.root) else None
            if reason is None:
                raise
            raise BadInput(f"store {store} is not reachable: {reason}") from None
    except BadInput as exc:
        reason = str(exc).replace("\r", "\\r").replace("\n", "\\n")  # always one line
        print(f"error: {reason}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _parser() -> argparse.ArgumentParser:
    store_help = "store folder or fsspec URL, e.g. s3://bucket/prefix (default: $SIEVE_STORE " \
                 "or ./sieve-store)"
    parser = _Parser(prog="sieve", description=__doc__)
    parser.add_argument("--store", help=store_help)
    common = _Parser(add_help=False)
    common.add_argument("--store", help=store_help, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", parents=[common], help="run the main flow")
    _add_flow_flags(run, "train.epochs=10", "run")
    run.set_defaults(command=cmd_run)

    query = sub.add_parser("query", parents=[common], help="SQL over a run's tables (DuckDB)")
    query.add_argument("sql")
    query.add_argument("--run", help="run id (default: the latest run)")
    query.add_argument("--format", choices=["table", "csv", "json"], default="table")
    query.add_argument("--limit", type=_row_limit, default=QUERY_ROWS, metavar="N",
                       help=f"print at most N rows (default {QUERY_ROWS:,}; 0: all rows)")
    query.set_defaults(command=cmd_query)

    evaluate = sub.add_parser("evaluate", parents=[common],
                              help="counterfactual evaluation: LOO, LDS, detection, prune curve")
    _add_flow_flags(evaluate, "model.name=logreg", "evaluation")
    evaluate.set_defaults(command=cmd_evaluate)

    runs = sub.add_parser("runs", parents=[common], help="list the store's runs")
    runs.set_defaults(command=cmd_runs)

    serve = sub.add_parser("serve", parents=[common],
                           help="Prefect server + MLflow UI, and the flows' deployments")
    _add_config_flags(serve, "serve.prefect_port=4300",
                      "YAML config: deployments' defaults, serve.*")
    serve.add_argument("--host", help="address the servers bind (default: serve.host, 127.0.0.1)")
    serve.add_argument("--prefect-port", type=int, help="default: serve.prefect_port, 4200")
    serve.add_argument("--mlflow-port", type=int, help="default: serve.mlflow_port, 5000")
    serve.set_defaults(command=cmd_serve)
    return parser


def _add_config_flags(parser: argparse.ArgumentParser, example: str,
                      config_help: str = "YAML config (default: the embedded default)") -> None:
    parser.add_argument("-c", "--config", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example}")


def _add_flow_flags(parser: argparse.ArgumentParser, example: str, what: str) -> None:
    """-c/--set, --resume and the output flags of a command that runs a flow."""
    _add_config_flags(parser, example)
    parser.add_argument("--resume", metavar="RUN_ID",
                        help=f"continue an interrupted {what}; one process at a time, on any "
                             "machine, may write a run (a second one is refused while the "
                             "first holds its lease)")
    _add_output_flags(parser)


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print only the run id (stdout) and errors (stderr)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (run id, store, report, summary rows) on "
                             "stdout; errors only on stderr")


def _config_and_run_id(args: argparse.Namespace, store: Store):
    """The validated config and run id of a new run, or of the run ``--resume`` names."""
    from flows.environment import configure

    configure(store.local_dir)  # before anything imports Prefect: it reads its settings then
    from storage.checkpoints import read_checkpoint_index, verify_checkpoints
    from storage.leases import check_free
    from tasks.config import load_config, load_resolved_config
    from tasks.train import preflight

    if args.resume is not None:  # --resume '' is a bad id, not a new run
        if args.config or args.set:
            raise BadInput("--resume continues a run with its own config; drop -c/--set")
        run = store.existing_run(args.resume)
        check_free(run)  # another process (here or on another machine) writes it now
        if not run.config.exists():
            raise BadInput(f"run {args.resume} has no config.yaml to resume from")
        config = load_resolved_config(run.config)
        run_id = args.resume
        if not run.samples.exists():
            config = preflight(config)
        if run.checkpoint_index.exists():  # a damaged checkpoint is refused before any work
            verify_checkpoints(read_checkpoint_index(run.checkpoints_dir))
    else:
        config = load_config(args.config, args.set)
        run_id = store.new_run_id()
        config = preflight(config)
    return config, run_id


def _run_flow(args: argparse.Namespace, store: Store, flow_name: str) -> int:
    """Validate, then run flow ``flow_name`` (pipeline, evaluate or multistage) and print its
    table (or, with --quiet, only the run id; with --json, one JSON object)."""
    config, run_id = _config_and_run_id(args, store)
    if config.multistage is not None:
        flow_name = _multistage_flow(config, flow_name)
    from flows.environment import start_local_api
    from flows.evaluate import evaluate
    from flows.multistage import multistage
    from flows.pipeline import pipeline
    from flows.runner import with_runner
    from presentation import report
    from presentation.json_summary import summary_json
    from presentation.terminal import flow_output
    from tasks.interrupts import interruption, signals_raise
    from tasks.progress import live_bars

    flow, show = {"pipeline": (pipeline, report.print_run_summary),
                  "evaluate": (evaluate, report.print_evaluation),
                  "multistage": (multistage, report.print_multistage)}[flow_name]
    flow = with_runner(flow, config)
    if args.quiet and not args.json:
        print(run_id, flush=True)
    started = time.perf_counter()
    with flow_output(quiet=args.quiet or args.json, bars=live_bars), signals_raise():
        try:
            start_local_api()  # a store's concurrent runs must not create Prefect's db at once
            summary = flow(config=config, store=str(store.root), run_id=run_id,
                           resume=args.resume is not None)
        except BaseException as exc:
            signum = interruption(exc)
            if signum is None:
                raise
            return _interrupted(store, run_id, "run" if flow_name != "evaluate" else flow_name,
                                signum)
    seconds = time.perf_counter() - started
    if args.json:
        print(summary_json(summary, seconds, config.skipped), flush=True)
    elif not args.quiet:
        show(summary, config, seconds)
    return 0


def _interrupted(store: Store, run_id: str, command: str, signum: int) -> int:
    """Say on stderr that a signal stopped run ``run_id`` and how to resume it; the exit code
    a process killed by ``signum`` has (128 + signum: 143 for SIGTERM, 130 for SIGINT)."""
    name = signal.Signals(signum).name
    if store.run(run_id).config.exists():
        print(f"interrupted by {name}: run {run_id} stopped; resume it with: sieve {command} "
              f"--store {store} --resume {run_id}", file=sys.stderr, flush=True)
    else:
        print(f"interrupted by {name} before run {run_id} wrote anything", file=sys.stderr,
              flush=True)
    return 128 + signum


def _multistage_flow(config, flow_name: str) -> str:
    """A config with a ``multistage:`` section runs the multistage flow (``sieve run`` only)."""
    if flow_name != "pipeline":
        raise BadInput("a multistage config runs with `sieve run` (its validate stage is the "
                       "evaluation)")
    from tasks.multistage import preflight_multistage

    preflight_multistage(config)
    return "multistage"


def cmd_run(args: argparse.Namespace, store: Store) -> int:
    return _run_flow(args, store, "pipeline")


def cmd_evaluate(args: argparse.Namespace, store: Store) -> int:
    return _run_flow(args, store, "evaluate")


def cmd_query(args: argparse.Namespace, store: Store) -> int:
    from storage.views import format_rows, open_run, run_query

    run = store.existing_run(args.run) if args.run is not None else store.latest_run()
    limit = args.limit or None
    with open_run(run) as con:
        columns, rows = run_query(con, args.sql, None if limit is None else limit + 1)
    more = limit is not None and len(rows) > limit
    print(format_rows(columns, rows[:limit], args.format))
    if more:
        print(f"(the first {limit:,} rows; more not fetched: --limit 0 prints all)",
              file=sys.stderr)
    return 0


def cmd_runs(args: argparse.Namespace, store: Store) -> int:
    from presentation.report import print_runs

    print_runs(store)
    return 0


def cmd_serve(args: argparse.Namespace, store: Store) -> int:
    from flows.serve import serve

    return serve(store, args.config, args.set, args.host, args.prefect_port, args.mlflow_port)


def console() -> None:
    """The ``sieve`` command: ``main``, then exit with its code. After an interruption
    (SIGTERM, SIGINT) it exits as soon as the threads have ended and the exit handlers have run
    (Prefect's temporary API server stopped), skipping the interpreter's teardown, which takes
    seconds of garbage collection on a loaded machine and is no use to a process that stops."""
    code = main()
    if code - 128 in (signal.SIGTERM, signal.SIGINT):
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
