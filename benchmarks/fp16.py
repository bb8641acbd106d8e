"""fp16 / bf16 weight storage: size, accuracy, latency vs fp32, and whether ORT folds the Casts.

    python benchmarks/fp16.py                  # digits MLP, CNN, Constant-node CNN, If-subgraph MLP
    python benchmarks/fp16.py --models mlp cnn --rounds 41

For each zoo model of examples/zoo.py it runs the fp16 pass (dtype float16 and bfloat16) in-process
and prints: file size ratio, held-out accuracy, the Cast nodes left in onnxruntime's optimized
graph (0 = every Cast was constant-folded at session load, so inference runs the fp32 kernels),
session creation time, and latency at batch 1 and 64 (median of interleaved rounds, and the
paired median ratio to fp32). It replaces the `fp16` section of benchmarks/RESULTS.md.
Nothing asserts.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))
import zoo
from common import replace_section
from modelpress.compressors.benchmark import session_options
from modelpress.compressors.model import check_model, load_model, normalize, to_bytes
from modelpress.compressors.quantize.fp16 import Fp16Config, Fp16Quantize
from modelpress.compressors.quantize.ort_probe import time_models

RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- fp16:begin -->", "<!-- fp16:end -->"


def casts_after_optimization(model: bytes, folder: Path) -> int:
    """Cast nodes (all subgraphs included) in the graph onnxruntime runs after its optimizations."""
    options = session_options(1)
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    graphs, count = [onnx.load(options.optimized_model_filepath).graph], 0
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            count += node.op_type == "Cast"
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
    return count


def load_seconds(model: bytes, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])
    return float((session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "constant_cnn", "if_model"], choices=sorted(zoo.ZOO))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    _, _, x_test, y_test = zoo.digits_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models:
            path = zoo.ZOO[name].build(folder)
            x = zoo.model_input(name, x_test)
            variants = {"fp32": path.read_bytes()}
            for dtype in ("float16", "bfloat16"):
                model = load_model(path)
                normalize(model)
                result = Fp16Quantize(Fp16Config(dtype=dtype)).call(model)
                check_model(result.model)
                variants[dtype] = to_bytes(result.model)
            timings = {batch: time_models(variants, {"input": x[:batch]}, args.threads, args.rounds) for batch in (1, 64)}
            for label, model in variants.items():
                rows.append((name, label, len(variants["fp32"]) / len(model), accuracy(model, x, y_test),
                             casts_after_optimization(model, folder), load_seconds(model) * 1e3,
                             *(f"{timings[b][label].median_us:.1f} ({timings[b][label].ratio:.2f})" for b in (1, 64))))
    header = ("model", "weights", "size ratio", "accuracy", "Casts left after ORT opt.", "session load ms",
              "batch 1 µs (÷fp32)", "batch 64 µs (÷fp32)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        name, label, ratio, acc, casts, load, b1, b64 = row
        lines.append(f"| {name} | {label} | {ratio:.2f}x | {acc:.4f} | {casts} | {load:.1f} | {b1} | {b64} |")
    table = "\n".join(lines)
    print(table)
    command = "python benchmarks/fp16.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    section = (f"{BEGIN}\n## fp16 / bf16 weight storage\n\n`{command.strip()}` — {platform.machine()}, "
               f"onnxruntime {ort.__version__}, {args.threads} threads, {args.rounds} interleaved rounds "
               "(machine shared with other jobs: ratios within ~±10 % are noise).\n\n"
               f"{table}\n\nSize ratio = fp32 file / compressed file. `Casts left` counts Cast nodes in the "
               "graph onnxruntime runs (optimized_model_filepath): 0 means every weight Cast was "
               f"constant-folded at load, so the fp32 kernels run.\n{END}\n")
    replace_section(RESULTS, BEGIN, END, section)


if __name__ == "__main__":
    main()
