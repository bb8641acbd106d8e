"""Time ONNX models already written, as `modelpress compress` times them: in turns, ratios to the first.

    python benchmarks/time_models.py BASE.onnx OTHER.onnx [MORE.onnx ...] --data evaluation.npz

Every model runs batch-1 feeds cut from the first samples of ``--data`` (an .npz named after the
model inputs), in turns of back-to-back runs with the order rotating each round
(``modelpress.compressors.benchmark.time_in_turns``). Prints p50 per model, the ratio of the p50s
to the first model's and the median of the paired per-run ratios. Pass the first model twice to
see the noise of the machine (a control that should read 1.00).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="the first is the base of the ratios")
    parser.add_argument("--data", type=Path, required=True, help=".npz of model inputs (first axis: samples)")
    parser.add_argument("--feeds", type=int, default=32, help="distinct batch-1 feeds cycled (default 32)")
    parser.add_argument("--runs", type=int, default=400, help="timed runs per model (default 400)")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up runs per model (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    args = parser.parse_args(argv)
    from modelpress.compressors.benchmark import make_session, time_in_turns

    data = {k: v for k, v in np.load(args.data).items() if k != "labels"}
    count = min(args.feeds, min(len(v) for v in data.values()))
    feeds = [{k: v[i : i + 1] for k, v in data.items()} for i in range(count)]
    sessions = [make_session(path, args.threads) for path in args.models]
    print(f"1-minute load average at start {os.getloadavg()[0]:.2f}; {args.runs} runs, {args.threads} threads")
    times = [np.asarray(t, dtype=np.float64) for t in time_in_turns(sessions, feeds, args.runs, args.warmup)]
    base = times[0]
    for path, t in zip(args.models, times):
        print(f"{path.name:60s} p50 {np.median(t) / 1e6:8.3f} ms   p50 / base {np.median(t) / np.median(base):.3f}"
              f"   paired {np.median(t / base):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
