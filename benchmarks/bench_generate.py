"""Generator speed: images per second of `synthval generate`, per kind and layout, on one core.

Times whole runs (drawing, encoding, JSON, the final rename) into a temporary folder, and separately the
drawing alone, as images per second of wall time and per second of this process's CPU time (the second
holds up on a busy machine). The data is procedural, NOT real. Not a test; run
`python benchmarks/bench_generate.py`.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from synthval.demo.generator import generate_dataset
from synthval.demo.procedural import render_scene

CASES = (("synthetic", "perception"), ("synthetic", "solo"), ("real-proxy", "perception"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 256])
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, one process, "
          f"{args.images} images per run")
    print(f"{'kind':<11} {'layout':<11} {'size':>5} {'draw img/s (cpu)':>17} {'generate img/s (cpu)':>21}")
    for size in args.sizes:
        for kind, layout in CASES:
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(args.images):
                render_scene(np.random.default_rng([0, i]), size, kind)
            draw = _rates(args.images, wall, cpu)
            with tempfile.TemporaryDirectory() as tmp:
                wall, cpu = time.perf_counter(), time.process_time()
                generate_dataset(kind, os.path.join(tmp, "d"), args.images, size, 0, layout)
                whole = _rates(args.images, wall, cpu)
            print(f"{kind:<11} {layout if kind == 'synthetic' else 'groceries':<11} {size:>5} {draw:>17} {whole:>21}")


def _rates(n: int, wall_start: float, cpu_start: float) -> str:
    wall = n / (time.perf_counter() - wall_start)
    cpu = n / max(time.process_time() - cpu_start, 1e-9)
    return f"{wall:.0f} ({cpu:.0f})"


if __name__ == "__main__":
    main()
