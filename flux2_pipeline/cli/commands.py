"""`flux2-pipeline`: parse the arguments, run the command, turn the outcome into an exit code
(docs/usage.md). User mistakes are one line on stderr, never a traceback. Each command
imports what it needs only once it knows it is the one to run.

Example::

    $ flux2-pipeline materialize --partition cats --retry-failed
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from flux2_pipeline import run_limits

USAGE_ERROR = 2
MOST_PARALLEL = run_limits.MOST_PARALLEL_PARTITIONS


def _bounded(
    convert: Callable[[str], float], low: float, high: float, what: str
) -> Callable[[str], Any]:
    """An argparse type: `convert` the text and require `low <= value <= high`."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_probability = _bounded(float, 0.0, 1.0, "a probability from 0 to 1")
_seconds = _bounded(float, 0.0, 86400.0, "a number of seconds from 0 to 86400")
_positive_int = _bounded(int, 1, 1_000_000, "a whole number >= 1")
_port = _bounded(int, 0, 65535, "a port from 0 to 65535")
_usd = _bounded(float, -1e9, 1e9, "an amount in USD")
_price = _bounded(float, 0.0, 1000.0, "a price in USD from 0 to 1000")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all four commands."""
    parser = argparse.ArgumentParser(
        prog="flux2-pipeline",
        description="FLUX.2 [dev] image edits at scale from Dagster.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="run the whole pipeline on sample data against the embedded emulator"
    )
    demo.add_argument("--workdir", default="flux2-demo", help="where the demo writes (wiped)")

    emulator = commands.add_parser("emulator", help="serve the RunComfy-compatible emulator")
    emulator.add_argument("--host", default="127.0.0.1", help="address to listen on")
    emulator.add_argument("--port", type=_port, default=8188, help="port (0: any free one)")
    emulator.add_argument(
        "--latency", type=_seconds, default=0.0, metavar="SECONDS", help="how long a job runs"
    )
    emulator.add_argument(
        "--max-concurrent", type=_positive_int, default=8, metavar="N", help="jobs run at once"
    )
    share = _share_flag(emulator)
    share("--fault-429", help="share of calls given 429")
    share("--fault-5xx", help="share of calls given 5xx")
    share("--fail-rate", help="share of jobs that fail")
    emulator.add_argument("--token", default=None, metavar="T", help="require this Bearer token")
    _emulator_dialect_flags(emulator)

    materialize = commands.add_parser(
        "materialize", help="materialize partitions of the input folder through Dagster"
    )
    materialize.add_argument("--partition", action="append", default=[], metavar="KEY")
    materialize.add_argument("--select", action="append", default=[], metavar="ASSET")
    materialize.add_argument(
        "--retry-failed", action="store_true", help="only partitions whose last run failed"
    )
    materialize.add_argument(
        "--parallel",
        type=_bounded(int, 1, MOST_PARALLEL, f"a whole number from 1 to {MOST_PARALLEL}"),
        default=None,
        metavar="N",
        help=f"Dagster runs at once, each over up to {run_limits.PARTITIONS_PER_RUN_VARIABLE} "
        f"({run_limits.DEFAULT_PARTITIONS_PER_RUN}) partitions (default: "
        f"{run_limits.PARALLEL_PARTITIONS_VARIABLE}, {run_limits.DEFAULT_PARALLEL_PARTITIONS})",
    )

    ui = commands.add_parser(
        "ui", help="the Dagster UI on the demo's folders, with a live emulator behind it"
    )
    ui.add_argument("--workdir", default="flux2-demo", help="the demo's folder (made if missing)")
    ui.add_argument("--port", type=_port, default=3000, help="the UI's port")
    ui.add_argument("--emulator-port", type=_port, default=8188, help="the emulator's port")
    return parser


def _share_flag(parser: argparse.ArgumentParser) -> Callable[..., Any]:
    """`add_argument` for a probability flag: metavar P, 0 by default."""
    return functools.partial(parser.add_argument, type=_probability, default=0.0, metavar="P")


def _emulator_dialect_flags(emulator: argparse.ArgumentParser) -> None:
    """The emulator's flags for RunComfy's dialect, its account and its connections."""
    share = _share_flag(emulator)
    emulator.add_argument(
        "--keep-alive",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="close idle client connections after this long (default 5, as uvicorn)",
    )
    emulator.add_argument(
        "--dialect",
        choices=("documented", "seed"),
        default="documented",
        help="documented: RunComfy's numeric error codes, 202 submits, succeeded/canceled, "
        "400005 for a result not ready, cost; seed: the first emulator's answers "
        "(default: documented)",
    )
    share(
        "--fault-200-error",
        help="answer this share of status/result polls with HTTP 200 and error 500001",
    )
    emulator.add_argument(
        "--result-lag",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="/result answers 400005 for this long after a job ended",
    )
    share("--succeeded-rate", help="share of completed jobs whose /status says 'succeeded'")
    emulator.add_argument(
        "--extra-states",
        action="store_true",
        help="queued jobs sometimes say pending/waiting, running ones starting/processing",
    )
    emulator.add_argument(
        "--error-shape",
        choices=("string", "object", "list"),
        default="string",
        help="a failed job's error: a text, an {error_code, error_message} object or a list",
    )
    emulator.add_argument(
        "--price-usd",
        type=_price,
        default=0.025,
        metavar="USD",
        help="price per output image: the model route's base_price_usd and each job's cost "
        "(default 0.025)",
    )
    emulator.add_argument(
        "--model-route",
        choices=("ok", "missing", "error"),
        default="ok",
        help="GET on the model's route answers its price and schema, 404 or 500",
    )
    emulator.add_argument(
        "--balance-usd",
        type=_usd,
        default=None,
        metavar="USD",
        help="the account's balance: completed jobs are charged to it and a submit it "
        "cannot cover is refused with 400002 (default: no balance kept)",
    )
    emulator.add_argument(
        "--balance-route",
        choices=("ok", "missing", "error", "denied"),
        default="ok",
        help="GET /prod/v2/balance answers the balance, 404, 500 or HTTP 200 with 403003",
    )
    emulator.add_argument(
        "--balance-error-http-200",
        action="store_true",
        help="refuse a submit the balance cannot cover with HTTP 200 instead of 400",
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `flux2-pipeline` console script."""
    # The imports ahead allocate many objects and no garbage: collections during them cost
    # 0.3 s of a 1.5 s start. Each command turns the collector back on (`_imports_done`).
    gc.disable()
    try:
        code = _run(argv)
    finally:
        gc.enable()
    # Python's exit would walk every object Dagster loaded, looking for cycles to free just
    # before the process frees everything anyway: 0.4 to 1 s of every command's wall time.
    gc.freeze()
    raise SystemExit(code)


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "materialize":
        # Before Dagster is imported here: the server imports its own copy meanwhile.
        from flux2_pipeline.cli.pool.server import start_early

        start_early(args.partition, args.parallel)
    from flux2_pipeline.ledger import LedgerConfigError
    from flux2_pipeline.resources import SettingsError

    # Beta/preview notices about Dagster APIs are for this project's developers, not its users.
    warnings.filterwarnings("ignore", category=Warning, module=r"dagster\..*")
    warnings.filterwarnings("ignore", message=r".*(is currently in (beta|preview)|superseded).*")
    try:
        return _dispatch(args)
    except (SettingsError, LedgerConfigError) as exc:
        print(f"flux2-pipeline: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("flux2-pipeline: interrupted", file=sys.stderr)
        return 130


def _imports_done() -> None:
    """Freeze what the imports built (it lives as long as the command, so no collection
    need walk it) and turn the collector back on."""
    gc.freeze()
    gc.enable()


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "emulator":
        return _emulator(args)
    if args.command == "demo":
        from flux2_pipeline.cli.demo import run_demo

        _imports_done()
        return run_demo(args.workdir)
    if args.command == "ui":
        from flux2_pipeline.cli.ui import run_ui

        _imports_done()
        return run_ui(args.workdir, port=args.port, emulator_port=args.emulator_port)
    return _backfill(args)


def _emulator(args: argparse.Namespace) -> int:
    from flux2_pipeline.emulator import EmulatorConfig, run_emulator
    from flux2_pipeline.resources import SettingsError

    _imports_done()
    # Each of the command's flags is the `EmulatorConfig` field of the same name.
    config = EmulatorConfig(**{k: v for k, v in vars(args).items() if k != "command"})
    try:
        run_emulator(config)
    except OSError as exc:
        raise SettingsError(f"--port: {exc}") from None
    except KeyboardInterrupt:
        pass  # Ctrl+C is how an emulator is meant to stop
    return 0


def _backfill(args: argparse.Namespace) -> int:
    from flux2_pipeline.cli.backfill import run_backfill
    from flux2_pipeline.cli.estimate import estimate_allows_start
    from flux2_pipeline.cli.progress import progress_view
    from flux2_pipeline.cli.report import format_report
    from flux2_pipeline.settings import Settings

    _imports_done()
    settings = Settings.from_env()
    if not estimate_allows_start(settings, args.partition, args.select):
        return 1
    with progress_view(sys.stdout) as progress:
        report = run_backfill(
            settings,
            partitions=args.partition,
            select=args.select,
            retry_failed=args.retry_failed,
            log_level="WARNING" if sys.stdout.isatty() else "INFO",
            progress=progress,
            parallel=args.parallel,
        )
    if not report.partitions and report.dataset is None and not report.skipped:
        print("nothing to materialize" + (" (no failed partitions)" if args.retry_failed else ""))
        return 0
    print(format_report(report))
    return 0 if report.succeeded else 1
