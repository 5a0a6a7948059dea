"""Load: what registering the input files on code-location load costs.

`Flux2EditsComponent` (and the project's own `Definitions`) add the input folder's new
files as partitions of DAGSTER_HOME's instance each time the code location loads, so
`dg launch --partition KEY` works before any sensor has run. This times the component's
`build_defs` over a folder of `--files` one-row tables, the median of `--repeat` loads:
without DAGSTER_HOME (nothing registered: the baseline), the first load on an empty
instance (every file added; the instance's tables already made, as `dagster dev` or the
first `dg launch` makes them), and the loads after it (nothing new: a listing, a query).

    python benchmarks/load.py                 # 1,000 files
    python benchmarks/load.py --files 10000
    python benchmarks/load.py --smoke
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import DagsterInstance, build_defs_for_component

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table

from flux2_pipeline import Flux2EditsComponent
from flux2_pipeline.assets import Flux2Keys


def write_files(folder: Path, count: int) -> None:
    """`count` one-row prompt tables (the listing's cost does not grow with rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        table = pa.table(
            {
                "id": [f"row-{index}"],
                "prompt": ["make it snow"],
                "image_urls": [["http://127.0.0.1:8188/samples/cat.png"]],
            }
        )
        pq.write_table(table, folder / f"p{index:05d}.parquet")


def time_loads(component: Flux2EditsComponent, repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        build_defs_for_component(component)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000, help="input files (default 1000)")
    parser.add_argument("--repeat", type=int, default=5, help="loads timed per row")
    parser.add_argument("--smoke", action="store_true", help="20 files, 2 loads")
    args = parser.parse_args()
    files, repeat = (20, 2) if args.smoke else (args.files, args.repeat)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory(prefix="flux2-load-") as temp:
        root = Path(temp)
        write_files(root / "prompts", files)
        component = Flux2EditsComponent(
            input_dir=str(root / "prompts"), output_dir=str(root / "out"), step_retries=0
        )
        os.environ.pop("DAGSTER_HOME", None)
        baseline = time_loads(component, repeat)
        home = root / "home"
        home.mkdir()
        (home / "dagster.yaml").write_text("")
        os.environ["DAGSTER_HOME"] = str(home)
        with DagsterInstance.get():
            pass  # the instance's tables are made once, by whatever opens it first
        first = time_loads(component, 1)
        later = time_loads(component, repeat)
        with DagsterInstance.get() as instance:
            registered = len(instance.get_dynamic_partitions(Flux2Keys().partitions_name))
    assert registered == files, f"registered {registered} of {files} files"
    rows = [
        {"load": "no DAGSTER_HOME (baseline)", "files": files, "median s": baseline},
        {"load": "first, empty instance (adds every file)", "files": files, "median s": first},
        {"load": "later (nothing new)", "files": files, "median s": later},
    ]
    for row in rows:
        row["median s"] = round(statistics.median(row["median s"]), 3)  # type: ignore[arg-type]
    print_table("load", rows)


if __name__ == "__main__":
    main()
