"""Memory: peak RSS of `flux2-pipeline materialize` on one partition of 10k and 100k rows.

The emulator runs in its own process with latency 0 and `--max-concurrent` = C, so
the run is bound by the pipeline itself. Each size gets a fresh output folder and
ledger; its partition is run twice: the first run sends every row to the emulator, the
re-run finds every row completed in the ledger, so its rows/s is the rate of
validation, ledger look-ups and Parquet writing alone. Peak RSS is ru_maxrss of that
child (os.wait4). Memory is flat when RSS at the largest size <= 1.2x the smallest.

    python benchmarks/memory.py                  # 10k and 100k rows, C=64
    python benchmarks/memory.py --rows 10000 --rows 50000
    python benchmarks/memory.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    cli_command,
    emulator,
    pipeline_env,
    print_table,
    run_child,
    write_prompt_table,
)

FLAT_RATIO = 1.2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, action="append", help="repeatable; default 10k, 100k")
    parser.add_argument("--concurrency", type=int, default=64, help="FLUX2_MAX_CONCURRENCY")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI): 100 and 300 rows")
    args = parser.parse_args(argv)
    sizes = sorted(args.rows or ([100, 300] if args.smoke else [10_000, 100_000]))
    rows: list[dict[str, Any]] = []
    peaks: dict[str, list[float]] = {"first run": [], "re-run": []}
    with emulator(0.0, max_concurrent=args.concurrency) as emu:
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix="flux2-mem-") as tmp:
                workdir = Path(tmp)
                write_prompt_table(workdir / "input" / "bench.parquet", size, emu)
                env = pipeline_env(emu, workdir, args.concurrency)
                command = [
                    *cli_command(),
                    "materialize",
                    "--partition",
                    "bench",
                    "--select",
                    "flux2_edits",
                ]
                for run in ("first run", "re-run"):
                    emu.reset()
                    emu_cpu = emu.cpu_seconds()
                    child = run_child(command, env)
                    if child.returncode != 0:
                        raise SystemExit(
                            f"materialize failed ({child.returncode}):\n{child.stderr[-3000:]}"
                        )
                    stats = emu.stats()
                    peaks[run].append(child.max_rss_mb)
                    rows.append(
                        {
                            "rows": size,
                            "run": run,
                            "wall s": child.wall,
                            "CPU s": child.cpu,
                            "peak RSS MB": child.max_rss_mb,
                            "x RSS smallest": child.max_rss_mb / peaks[run][0],
                            "rows/s": size / child.wall,
                            "submits": stats["submits_total"],
                            "emulator CPU %": 100 * (emu.cpu_seconds() - emu_cpu) / child.wall,
                        }
                    )
    print_table(f"memory (C={args.concurrency}, emulator latency 0)", rows)
    for run, values in peaks.items():
        ratio = values[-1] / values[0]
        verdict = "flat" if ratio <= FLAT_RATIO else "NOT flat"
        print(f"{run}: RSS at {sizes[-1]} rows = {ratio:.2f}x RSS at {sizes[0]} rows ({verdict})")


if __name__ == "__main__":
    main()
