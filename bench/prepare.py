"""Rows/s of `prepare` on Home Depot (59,127 rows) through Ray Data and through a plain pandas pass, same run.

Ray is started (and warmed with one small run) before timing, so the figures compare the transform itself;
Ray's start-up (about 3 s, once per process) is printed separately. Each engine runs `--repeats` times,
alternating, and the median is reported.

    .venv/bin/python bench/prepare.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipelines.env import apply_defaults

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "home_depot_search_relevance"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--path", type=Path, default=DATA)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a stopped run still shows the rows it measured
    apply_defaults()
    from pipelines.data.relevance import PrepareConfig, prepare_relevance
    from pipelines.raycluster import ensure_ray

    t0 = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - t0
    times: dict[str, list[float]] = {"pandas": [], "ray": []}
    rows = 0
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        warm.mkdir()
        prepare_relevance("crowdflower", args.path.parent / "crowdflower_search_relevance", warm,
                          PrepareConfig(engine="ray"))
        for i in range(args.repeats):
            for engine in ("pandas", "ray"):
                out = Path(tmp) / f"{engine}-{i}"
                out.mkdir()
                start = time.perf_counter()
                summary = prepare_relevance("homedepot", args.path, out, PrepareConfig(engine=engine))
                times[engine].append(time.perf_counter() - start)
                rows = summary["rows_read"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"Home Depot prepare, {rows} rows, median of {args.repeats} (Ray start-up {ray_start:.1f} s, not included)")
    print(f"{'engine':<8} {'seconds':>8} {'rows/s':>10}")
    for engine, sec in med.items():
        print(f"{engine:<8} {sec:>8.2f} {rows / sec:>10,.0f}")
    print(f"ray / pandas time ratio: {med['ray'] / med['pandas']:.2f}x (target <= 2.0)")


if __name__ == "__main__":
    main()
