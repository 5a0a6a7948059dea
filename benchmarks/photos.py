"""Memory: peak RSS of `flux2-pipeline materialize` on camera-sized reference photos.

Each case is one partition of N rows with one reference each (edits, images, training
dataset: the whole command), against the emulator in its own process (latency 0). The
references are PNGs of a flat colour with sparse noise (a photo's pixel count, a few MB on
disk), written by a child process and served from a loopback `python -m http.server`, so
neither their pixels nor the server count in the benchmark's own pages.

* 48 MP (8000x6000), 12 and 48 rows: memory must not grow with the number of photos.
* 102 MP (12000x8500, a medium-format camera), 4 rows: decoded alone under the budget.
* Six 9400x9400 PNG bombs (343 KB each, 88 MP of zeros).

Peak RSS is `ru_maxrss` from `os.wait4` of a small wrapper that runs the command as its
child and is the subreaper of every process the command starts (the worker server and its
workers), so it is the largest peak among all of them. Target: <= 1 GiB in every case.

    python benchmarks/photos.py             # the cases above
    python benchmarks/photos.py --rows 96   # also 96 rows of 48 MP
    python benchmarks/photos.py --smoke     # tiny images (CI)
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ChildRun, Emulator, cli_command, emulator, pipeline_env, print_table, run_child

TARGET_MB = 1024.0
BOMB_SIDE = 9400
WRAPPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
code = subprocess.call(sys.argv[1:])
while True:  # reap what the command left behind, so its usage is counted too
    try:
        os.wait()
    except ChildProcessError:
        break
sys.exit(code)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, action="append", help="48 MP rows; default 12, 48")
    parser.add_argument("--smoke", action="store_true", help="tiny images (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        cases = [("photo", (800, 600), 2), ("bomb", (BOMB_SIDE, BOMB_SIDE), 1)]
    else:
        cases = [("photo", (8000, 6000), rows) for rows in sorted(set(args.rows or [12, 48]))]
        cases += [("photo", (12000, 8500), 4), ("bomb", (BOMB_SIDE, BOMB_SIDE), 6)]
    table: list[dict[str, Any]] = []
    with emulator(0.0, max_concurrent=64) as emu:
        for kind, size, rows in cases:
            child = measure(emu, kind, size, rows)
            table.append(figures(kind, size, rows, child))
            print(table[-1], flush=True)
    print_table("photos (whole materialize command, emulator latency 0)", table)
    worst = max(row["peak RSS MB"] for row in table)
    met = "met" if worst <= TARGET_MB else "NOT met"
    print(f"largest peak RSS {worst:.0f} MB (target <= {TARGET_MB:.0f} MB: {met})")


def measure(emu: Emulator, kind: str, size: tuple[int, int], rows: int) -> ChildRun:
    with tempfile.TemporaryDirectory(prefix="flux2-photos-") as tmp:
        workdir = Path(tmp)
        references = workdir / "references"
        width, height = size
        writer = [sys.executable, __file__, "write-images", str(references), kind]
        subprocess.run([*writer, str(width), str(height), str(rows)], check=True)
        with served(references) as base_url:
            write_table(workdir / "input" / "photos.parquet", base_url, rows)
            env = pipeline_env(emu, workdir, 16)
            emu.reset()
            child = run_child([sys.executable, "-c", WRAPPER, *cli_command(), "materialize"], env)
        if child.returncode != 0:
            raise SystemExit(f"materialize failed ({child.returncode}):\n{child.stderr[-3000:]}")
        return child


def figures(kind: str, size: tuple[int, int], rows: int, child: ChildRun) -> dict[str, Any]:
    width, height = size
    return {
        "references": f"{rows} x {width}x{height} {'PNG bomb' if kind == 'bomb' else 'PNG'}",
        "MP each": width * height / 1e6,
        "wall s": child.wall,
        "CPU s": child.cpu,
        "peak RSS MB": child.max_rss_mb,
    }


@contextmanager
def served(folder: Path) -> Iterator[str]:
    """`python -m http.server` on a free loopback port for `folder`; its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://...) ..."
    try:
        port = int(line.split(" port ", 1)[1].split()[0])
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def write_table(path: Path, base_url: str, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True)
    table = pa.table(
        {
            "id": [f"photo-{i}" for i in range(rows)],
            "prompt": [f"make photo {i} look like a watercolour" for i in range(rows)],
            "image_urls": [[f"{base_url}/ref-{i}.png"] for i in range(rows)],
        }
    )
    pq.write_table(table, path)


def _write_images(argv: list[str]) -> None:
    import numpy as np
    from PIL import Image

    folder, kind = Path(argv[0]), argv[1]
    width, height, rows = (int(value) for value in argv[2:5])
    folder.mkdir(parents=True)
    for i in range(rows):
        if kind == "bomb":
            image = Image.new("RGB", (width, height))
        else:
            rng = np.random.default_rng(i)
            pixels = np.empty((height, width, 3), np.uint8)
            pixels[:] = rng.integers(30, 220, 3, dtype=np.uint8)
            count = width * height // 400
            ys, xs = rng.integers(0, height, count), rng.integers(0, width, count)
            pixels[ys, xs] = rng.integers(0, 256, (count, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=9 if kind == "bomb" else 1)
        (folder / f"ref-{i}.png").write_bytes(buffer.getvalue())


if __name__ == "__main__":
    if sys.argv[1:2] == ["write-images"]:
        _write_images(sys.argv[2:])
    else:
        main()
