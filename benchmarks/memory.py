"""Memory: peak RSS of `flux2-pipeline materialize` on one partition as the row count grows.

The emulator runs in its own process with latency 0 and `--max-concurrent` = C, so the
run is bound by the pipeline itself. Each case gets a fresh output folder and ledger.

* Valid rows, 10k and 100k (and 1M with `--full`, which takes tens of minutes), with the
  input written in 50,000-row groups and as one row group (what pandas writes by
  default). Each partition runs twice: the first run sends every row to the emulator;
  the re-run finds every row completed in the ledger, so its rate is that of
  validation, ledger look-ups and Parquet writing alone.
* Invalid rows (an empty prompt), 10k and 400k in one row group: no API call at all,
  so memory is that of reading, validating and writing.

Peak RSS is ru_maxrss of the `flux2-pipeline materialize` child (os.wait4); the input
tables are written by another child, so the benchmark itself stays small. Targets:
RSS at the largest size <= 1.3x RSS at 10k, for every layout and run.

    python benchmarks/memory.py                  # 10k and 100k, both layouts, + invalid
    python benchmarks/memory.py --full           # also 1M rows
    python benchmarks/memory.py --smoke          # tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ChildRun,
    Emulator,
    cli_command,
    emulator,
    pipeline_env,
    print_table,
    run_child,
    write_prompt_table_in_child,
)

FLAT_RATIO = 1.3
GROUPED = 50_000
LAYOUTS = {"grouped": (f"{GROUPED // 1000}k-row groups", GROUPED), "single": ("one row group", 0)}
"""`--layout` names: the input in 50k-row groups, or as one row group (pandas' default)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, action="append", help="repeatable; default 10k, 100k")
    parser.add_argument("--full", action="store_true", help="add 1,000,000 rows (slow)")
    parser.add_argument("--concurrency", type=int, default=64, help="FLUX2_MAX_CONCURRENCY")
    parser.add_argument("--invalid-rows", type=int, default=400_000, help="the invalid case")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        action="append",
        help="repeatable; default both (run one per process to use both cores)",
    )
    parser.add_argument("--no-invalid", action="store_true", help="skip the invalid-rows case")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI), one layout")
    args = parser.parse_args(argv)
    if args.smoke:
        sizes, invalid_sizes, layouts = [100, 300], [300], {"one row group": 0}
    else:
        sizes = sorted(set(args.rows or [10_000, 100_000]) | ({1_000_000} if args.full else set()))
        invalid_sizes = [] if args.no_invalid else sorted({10_000, args.invalid_rows})
        layouts = dict(LAYOUTS[name] for name in (args.layout or LAYOUTS))
    table: list[dict[str, Any]] = []
    verdicts: list[str] = []
    with emulator(0.0, max_concurrent=args.concurrency) as emu:
        for layout, group in layouts.items():
            peaks: dict[str, list[float]] = {"first run": [], "re-run": []}
            for size in sizes:
                runs = measure(emu, size, group or size, False, args.concurrency, 2)
                for run, child in zip(peaks, runs, strict=True):
                    peaks[run].append(child.max_rss_mb)
                    table.append(figures(size, layout, run, child, peaks[run][0]))
                    print(table[-1], flush=True)  # a long run shows its progress
            for run, values in peaks.items():
                verdicts.append(verdict(f"{layout}, {run}", sizes, values))
        invalid_peaks: list[float] = []
        for size in invalid_sizes:
            (child,) = measure(emu, size, size, True, args.concurrency, 1)
            invalid_peaks.append(child.max_rss_mb)
            table.append(figures(size, "one row group", "invalid rows", child, invalid_peaks[0]))
            print(table[-1], flush=True)
        if len(invalid_sizes) > 1:
            verdicts.append(verdict("invalid rows, one row group", invalid_sizes, invalid_peaks))
    print_table(f"memory (C={args.concurrency}, emulator latency 0)", table)
    print("\n".join(verdicts))


def measure(
    emu: Emulator, size: int, group: int, invalid: bool, concurrency: int, runs: int
) -> list[ChildRun]:
    """Write the table, then materialize its partition `runs` times in a row."""
    with tempfile.TemporaryDirectory(prefix="flux2-mem-") as tmp:
        workdir = Path(tmp)
        path = workdir / "input" / "bench.parquet"
        write_prompt_table_in_child(path, size, emu.base_url, group, invalid=invalid)
        env = pipeline_env(emu, workdir, concurrency)
        command = [*cli_command(), "materialize", "--partition", "bench", "--select", "flux2_edits"]
        children = []
        for _ in range(runs):
            emu.reset()
            # A 1M-row first run takes 40 to 100 minutes on 2 cores: the limit grows with it.
            child = run_child(command, env, timeout=max(3600.0, size * 0.05))
            # Invalid rows make the command exit 1 (rows need attention), never 2 or worse.
            if child.returncode not in ((0, 1) if invalid else (0,)):
                failure = f"materialize failed ({child.returncode}):\n{child.stderr[-3000:]}"
                raise SystemExit(failure)
            submits = emu.stats()["submits_total"]
            if invalid and submits:
                raise SystemExit(f"{submits} invalid rows were submitted")
            children.append(child)
        return children


def figures(size: int, layout: str, run: str, child: ChildRun, first_peak: float) -> dict[str, Any]:
    return {
        "rows": size,
        "input": layout,
        "run": run,
        "wall s": child.wall,
        "CPU s": child.cpu,
        "CPU ms/row": 1000 * child.cpu / size,
        "peak RSS MB": child.max_rss_mb,
        "x RSS smallest": child.max_rss_mb / first_peak,
        "rows/s": size / child.wall,
    }


def verdict(label: str, sizes: list[int], peaks: list[float]) -> str:
    ratio = peaks[-1] / peaks[0]
    met = "met" if ratio <= FLAT_RATIO else "NOT met"
    return (
        f"{label}: RSS at {sizes[-1]} rows = {ratio:.2f}x RSS at {sizes[0]} rows "
        f"(target <= {FLAT_RATIO}x: {met})"
    )


if __name__ == "__main__":
    main()
