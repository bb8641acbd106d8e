"""How `modelpress compress` times latency: turns of back-to-back runs vs alternating run by run.

The CLI times the original and the compressed model in one process, alternating them so a noisy
neighbour or a clock change hits both alike. Alternating *run by run* has a cost on a small
machine: after a run, ONNX Runtime's intra-op threads spin waiting for more work, and the other
session's run competes with them for the cores. This script measures, on all-MiniLM-L6-v2 (batch
1 x 128 tokens, 2 threads, ORT's default spinning) and in one process:

- *alone*: each session timed in one long block of back-to-back runs, in the order A B B A (the
  halves cancel a linear drift): how a user running one model sees it;
- *run by run*: the sessions alternated every run, the order rotating (the CLI's method before);
- *turns*: `modelpress.compressors.benchmark.time_in_turns` (the CLI's method now).

Pairs: fp32 against a second fp32 session (control: the ratio should read 1.00) and against ONNX
Runtime's own `quantize_dynamic` int8 (per-tensor; the stock tool, no modelpress pass involved).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402
from common import replace_section  # noqa: E402
from compare_int8 import machine  # noqa: E402

BEGIN, END = "<!-- latency-method:begin -->", "<!-- latency-method:end -->"


def alone(sessions, feeds, runs: int, warmup: int) -> list[list[int]]:
    times = [[] for _ in sessions]
    half = runs // 2
    for which in [*range(len(sessions)), *reversed(range(len(sessions)))]:
        session = sessions[which]
        for i in range(warmup):
            session.run(None, feeds[i % len(feeds)])
        for i in range(half):
            started = time.perf_counter_ns()
            session.run(None, feeds[i % len(feeds)])
            times[which].append(time.perf_counter_ns() - started)
    return times


def run_by_run(sessions, feeds, runs: int, warmup: int) -> list[list[int]]:
    times = [[] for _ in sessions]
    for i in range(warmup):
        for session in sessions:
            session.run(None, feeds[i % len(feeds)])
    for i in range(runs):
        for k in range(len(sessions)):
            which = (k + i) % len(sessions)
            started = time.perf_counter_ns()
            sessions[which].run(None, feeds[i % len(feeds)])
            times[which].append(time.perf_counter_ns() - started)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per session and method (default 200)")
    parser.add_argument("--repeats", type=int, default=2, help="times the three methods are measured (default 2)")
    parser.add_argument("--work-dir", type=Path, help="keep the models here")
    parser.add_argument("--results", type=Path, default=minilm.RESULTS, help="markdown file to refresh")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args(argv)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from modelpress.compressors.benchmark import TURN_RUNS, make_session, time_in_turns

    command, env = minilm.command_line(__file__, argv), machine()
    with tempfile.TemporaryDirectory(prefix="latency_method_") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("exporting all-MiniLM-L6-v2 ...", file=sys.stderr, flush=True)
        model = minilm.export_minilm(work / "all-MiniLM-L6-v2.onnx")
        int8 = work / "ort-dynamic-int8.onnx"
        quantize_dynamic(str(model), str(int8), weight_type=QuantType.QInt8)
        _, evaluation = minilm.sentence_data(work, 1, 32)
        feeds = [{k: v[i : i + 1] for k, v in evaluation.items()} for i in range(32)]
        sessions = [make_session(model, 2), make_session(model, 2), make_session(int8, 2)]
        methods = {"alone (A B B A blocks)": alone, "run by run (before)": run_by_run,
                   f"turns of {TURN_RUNS} (now)": time_in_turns}
        rows = []
        for repeat in range(args.repeats):
            for name, method in methods.items():
                for pair in ((0, 1), (0, 2)):
                    times = method([sessions[i] for i in pair], feeds, args.runs, 10)
                    p50 = [float(np.median(t)) / 1e6 for t in times]
                    rows.append((repeat + 1, name, "fp32 control" if pair[1] == 1 else "ORT int8", p50[0], p50[1]))
                    print(f"{repeat + 1} {name:24s} {rows[-1][2]:12s} fp32 {p50[0]:6.2f} ms  other {p50[1]:6.2f} ms  "
                          f"ratio {p50[1] / p50[0]:.3f}", flush=True)
    lines = [
        BEGIN,
        "## Latency method: turns of back-to-back runs vs alternating run by run",
        "",
        f"Generated by `benchmarks/latency_method.py` on {time.strftime('%Y-%m-%d')}:",
        "",
        "```",
        command,
        "```",
        "",
        f"- Machine: {env['cpu']}, {env['cores']} cores; 1-minute load average at start {env['load_avg_1m']:.2f}. "
        f"onnxruntime {env['onnxruntime']}.",
        f"- all-MiniLM-L6-v2 at batch 1 x {minilm.SEQ} tokens, 2 intra-op threads, ORT's default spinning; "
        f"{args.runs} timed runs per session and method after 10 warm-ups; p50 in ms; *ratio* = other / fp32.",
        "",
        "| repeat | method | pair | fp32 p50 ms | other p50 ms | ratio |",
        "|---|---|---|---|---|---|",
        *[f"| {r} | {m} | {p} | {a:.2f} | {b:.2f} | {b / a:.3f} |" for r, m, p, a, b in rows],
        END,
    ]
    if not args.no_write:
        replace_section(args.results, BEGIN, END, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
