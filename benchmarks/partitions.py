"""Partitions: Dagster's fixed cost per partition, and what a single-run backfill would save.

Registers `--partitions` tiny input files (1 row each) and runs `flux2-pipeline
materialize` over all of them, at each `--parallel` value (runs at once, default 4) and
each `--per-run` value (FLUX2_PARTITIONS_PER_RUN: 1 = one Dagster run per partition,
the old behaviour; 25 = the default ranges), against the emulator in its own process
(latency 0): wall / partitions is the fixed cost each partition pays. CPU is summed over
the command and its worker processes. Then a prototype, outside the product: two trivial
partitioned assets on a throwaway instance, one materialized one run per partition (what
`flux2_edits` does, `BackfillPolicy.multi_run(1)`), one in a single run over the whole key
range (`BackfillPolicy.single_run()`), to measure the orchestration cost a single run saves.

    python benchmarks/partitions.py                    # 200 partitions
    python benchmarks/partitions.py --partitions 1000
    python benchmarks/partitions.py --smoke
"""

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    DagsterInstance,
    Definitions,
    DynamicPartitionsDefinition,
    asset,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    cli_command,
    emulator,
    pipeline_env,
    print_table,
    write_prompt_table,
)
from backfill import run_command

DEFAULT_PARALLEL = (4,)
DEFAULT_PER_RUN = (25,)


def prototype(partitions: int, home: Path) -> dict[str, float]:
    """Seconds per partition for multi-run vs single-run of a trivial partitioned asset."""
    keys = [f"p{i:05d}" for i in range(partitions)]
    multi_parts = DynamicPartitionsDefinition(name="proto_multi")
    single_parts = DynamicPartitionsDefinition(name="proto_single")

    @asset(partitions_def=multi_parts, backfill_policy=BackfillPolicy.multi_run(1))
    def proto_multi(context: AssetExecutionContext) -> None:
        context.log.info(f"partition {context.partition_key}")

    @asset(partitions_def=single_parts, backfill_policy=BackfillPolicy.single_run())
    def proto_single(context: AssetExecutionContext) -> None:
        for key in context.partition_keys:
            context.log.info(f"partition {key}")

    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions("proto_multi", keys)
    instance.add_dynamic_partitions("proto_single", keys)
    defs = Definitions(assets=[proto_multi, proto_single])
    job = defs.resolve_implicit_global_asset_job_def()
    multi_key = [proto_multi.key]
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}

    started = time.perf_counter()
    for key in keys:
        result = job.execute_in_process(
            instance=instance, partition_key=key, asset_selection=multi_key, run_config=quiet
        )
        assert result.success
    multi = time.perf_counter() - started

    started = time.perf_counter()
    result = job.execute_in_process(
        instance=instance,
        asset_selection=[proto_single.key],
        run_config=quiet,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )
    assert result.success
    single = time.perf_counter() - started
    materialized = instance.get_materialized_partitions(proto_single.key)
    assert len(materialized) == partitions, f"single run covered {len(materialized)} partitions"
    return {"multi": multi, "single": single}


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=r".*is currently in beta.*")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--partitions", type=int, default=200, help="1-row input files (200)")
    parser.add_argument(
        "--no-prototype", action="store_true", help="skip the single- vs multi-run prototype"
    )
    parser.add_argument(
        "--parallel", type=int, action="append", help=f"--parallel values {DEFAULT_PARALLEL}"
    )
    parser.add_argument(
        "--per-run", type=int, action="append", help=f"FLUX2_PARTITIONS_PER_RUN {DEFAULT_PER_RUN}"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI): 3 partitions")
    args = parser.parse_args(argv)
    count = 3 if args.smoke else args.partitions
    rows: list[dict[str, Any]] = []
    with (
        emulator(0.0, max_concurrent=8) as emu,
        tempfile.TemporaryDirectory(prefix="flux2-parts-") as tmp,
    ):
        workdir = Path(tmp)
        modes = [
            (parallel, per_run)
            for parallel in args.parallel or DEFAULT_PARALLEL
            for per_run in args.per_run or DEFAULT_PER_RUN
        ]
        for parallel, per_run in modes:
            # A fresh output folder and ledger each time, so every run pays for its jobs.
            rundir = workdir / f"parallel-{parallel}-{per_run}"
            for i in range(count):
                write_prompt_table(rundir / "input" / f"p{i:05d}.parquet", 1, emu, start=i)
            env = pipeline_env(emu, rundir, 8, {"FLUX2_PARTITIONS_PER_RUN": str(per_run)})
            command = [*cli_command(), "materialize", "--select", "flux2_edits"]
            wall, cpu, out = run_command([*command, "--parallel", str(parallel)], env)
            done = out.count(" ok")
            if done != count:
                raise SystemExit(f"only {done} of {count} partitions succeeded:\n{out[-2000:]}")
            rows.append(
                {
                    "what": f"flux2-pipeline materialize --parallel {parallel}, {per_run}/run",
                    "partitions": count,
                    "wall s": wall,
                    "CPU s": cpu,
                    "s/partition": wall / count,
                }
            )
        if not args.no_prototype:
            saved = os.environ.get("DAGSTER_HOME")
            try:
                figures = prototype(count, workdir / "proto_home")
            finally:
                if saved is not None:
                    os.environ["DAGSTER_HOME"] = saved
            for policy in ("multi", "single"):
                label = "multi_run(1)" if policy == "multi" else "single_run()"
                rows.append(
                    {
                        "what": f"prototype trivial asset, BackfillPolicy.{label}",
                        "partitions": count,
                        "wall s": figures[policy],
                        "CPU s": None,
                        "s/partition": figures[policy] / count,
                    }
                )
    print_table("partitions (1 row each, emulator latency 0)", rows)


if __name__ == "__main__":
    main()
