"""modelpress `int8` vs onnxruntime's `quantize_dynamic(per_channel=True)` on the example zoo.

    python benchmarks/compare_int8.py                      # all five models, 1000 timed runs each
    python benchmarks/compare_int8.py --models mlp,cnn --quick

For each zoo model (examples/zoo.py, trained in seconds on scikit-learn's digits) this script
1. builds the fp32 model and its data (calibration: 256 training digits; evaluation: the 450
   held-out digits, with labels),
2. runs `modelpress compress MODEL --recipe int8 --data CALIB --eval-data EVAL ...` as a subprocess
   and records its exit code and error if it fails,
3. runs `onnxruntime.quantization.quantize_dynamic(per_channel=True)`, recording a crash, a model
   ORT cannot load, or a model left unquantized as such instead of stopping,
4. times fp32, modelpress and ORT-dynamic in this one process taking turns of back-to-back runs (the
   order rotates every round, batch 1, warm-up first) so machine noise hits all three alike, and
   measures size, int8 share of the stored weights, held-out accuracy and argmax agreement with fp32.

It prints one table and replaces the `compare_int8` section of benchmarks/RESULTS.md (the command,
the machine and the figures). It is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import zoo  # noqa: E402
from common import replace_section  # noqa: E402

from modelpress.compressors.benchmark import TURN_RUNS, time_in_turns  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- compare_int8:begin -->", "<!-- compare_int8:end -->"
CALIBRATION_SAMPLES = 256
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "asimd", "i8mm", "sve")
INT8_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
              onnx.TensorProto.UINT4}


@dataclass
class Variant:
    """One model file of one model: fp32, modelpress int8 or ORT dynamic."""

    label: str
    path: Path | None = None
    status: str = "ok"  # "ok" or why there is no figure: "crashed: ...", "unloadable: ..."
    note: str = ""  # a remark on a working model, e.g. "nothing quantized"
    session: ort.InferenceSession | None = None
    latencies_ms: list[float] = field(default_factory=list)
    figures: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- building


def build(name: str, work: Path, seed: int) -> tuple[Path, Path, Path, np.ndarray, np.ndarray]:
    """The fp32 model, its calibration and evaluation .npz, and the evaluation arrays."""
    x_train, y_train, x_test, y_test = zoo.digits_data(seed)
    model = zoo.ZOO[name].build(work, seed=seed)
    x_calib = zoo.model_input(name, x_train[:CALIBRATION_SAMPLES])
    x_eval = zoo.model_input(name, x_test)
    calib = zoo.write_data(work / f"{name}.calib.npz", x_calib, y_train[:CALIBRATION_SAMPLES])
    evaluation = zoo.write_data(work / f"{name}.eval.npz", x_eval, y_test)
    return model, calib, evaluation, x_eval, y_test


def modelpress_command(model: Path, calib: Path, evaluation: Path, out: Path, quick: bool) -> list[str]:
    command = [sys.executable, "-m", "modelpress", "compress", str(model), "--recipe", "int8",
               "--data", str(calib), "--eval-data", str(evaluation), "--output", str(out),
               "--report-json", str(out.with_suffix(".json")), "--force", "--quiet"]
    if quick:  # the CLI's own benchmark is not what this script reports; keep it short
        command += ["--runs", "10", "--warmup", "2"]
    return command


def run_modelpress(model: Path, calib: Path, evaluation: Path, quick: bool) -> Variant:
    out = model.with_name(model.stem + ".modelpress.onnx")
    variant = Variant("modelpress int8", out)
    start = time.perf_counter()
    done = subprocess.run(modelpress_command(model, calib, evaluation, out, quick),
                          capture_output=True, text=True, timeout=900)
    variant.figures["compress_s"] = time.perf_counter() - start
    # Exit 1 is a missed gate: the outputs are written and still worth measuring.
    if done.returncode not in (0, 1) or not out.exists():
        variant.status = f"failed (exit {done.returncode}): {cli_error(done.stderr or done.stdout)}"
    elif done.returncode == 1:
        variant.note = "a recipe gate missed"
    return variant


def cli_error(output: str) -> str:
    """The CLI's error, from its first line that says "error" on (messages may wrap), one line."""
    lines = output.strip().splitlines() or ["no output"]
    start = next((i for i, line in enumerate(lines) if "error" in line.lower()), len(lines) - 1)
    return " ".join(" ".join(lines[start:]).split())[:200]


def run_ort_dynamic(model: Path) -> Variant:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = model.with_name(model.stem + ".ort-dynamic.onnx")
    variant = Variant("ORT dynamic", out)
    start = time.perf_counter()
    try:
        quantize_dynamic(model, out, per_channel=True, weight_type=QuantType.QInt8)
    except Exception as error:  # whatever it raises is the finding
        variant.status = f"crashed: {type(error).__name__}: {reason(error)}"
    variant.figures["compress_s"] = time.perf_counter() - start
    return variant


def reason(error: BaseException) -> str:
    """One line: ORT's failing node and the final clause of its message, not its source paths."""
    text = " ".join(str(error).split()) or repr(error)
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    if " was false. " in text:
        text = text.rsplit(" was false. ", 1)[1]
    elif "Status Message: " in text:
        text = text.rsplit("Status Message: ", 1)[1]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    if node:
        text = f"{node[1]} {node[2]!r}: {text}"
    return text[:200]


# --------------------------------------------------------------------------- measuring


def open_session(variant: Variant, threads: int, probe: dict) -> None:
    """Load the model and run it once; a model ORT cannot load or run gets that as its status."""
    if variant.status != "ok":
        return
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4  # failures are caught and reported below, not logged twice
    try:
        session = ort.InferenceSession(str(variant.path), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as error:  # e.g. ConvInteger with int8 weights has no CPU kernel
        variant.status = f"unloadable: {reason(error)}"
        return
    try:
        session.run(None, probe)
    except Exception as error:  # loads, then a kernel rejects its own quantizer's output
        variant.status = f"fails at run: {reason(error)}"
        return
    variant.session = session


def tensors(graph: onnx.GraphProto):
    """Every stored tensor: initializers and Constant values, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from tensors(attr.g)
            for sub in attr.graphs:
                yield from tensors(sub)


def int8_share(path: Path) -> float:
    """Fraction of the stored tensor bytes that are 8-bit (or narrower) integers."""
    total = low = 0
    for tensor in tensors(onnx.load(path).graph):
        size = onnx.numpy_helper.to_array(tensor).nbytes
        total += size
        low += size if tensor.data_type in INT8_TYPES else 0
    return low / total if total else 0.0


# How the scripts' markdown names the timing of time_interleaved.
TURNS = f"in turns of {TURN_RUNS} back-to-back runs, the order rotating each round"

def time_interleaved(variants: list[Variant], feeds: list[dict], runs: int, warmup: int) -> None:
    """Time the sessions taking turns of back-to-back runs, the order rotating each round
    (``modelpress.compressors.benchmark.time_in_turns``, as ``modelpress compress`` times), so drift
    and neighbours' load on the shared machine hit every variant alike."""
    live = [v for v in variants if v.session is not None]
    for v, times in zip(live, time_in_turns([v.session for v in live], feeds, runs, warmup)):
        v.latencies_ms.extend(t / 1e6 for t in times)


def measure(variants: list[Variant], x_eval: np.ndarray, y_eval: np.ndarray, runs: int,
            warmup: int) -> None:
    fp32 = variants[0]
    feeds = [{zoo.INPUT: x_eval[i:i + 1]} for i in range(min(len(x_eval), 64))]
    time_interleaved(variants, feeds, runs, warmup)
    reference = fp32.session.run(None, {zoo.INPUT: x_eval})[0].argmax(axis=1)
    for v in variants:
        if v.session is None:
            continue
        predicted = v.session.run(None, {zoo.INPUT: x_eval})[0].argmax(axis=1)
        share = int8_share(v.path)
        if v is not fp32 and share == 0.0:
            v.note = v.note or "nothing quantized"
        v.figures.update(
            size_bytes=v.path.stat().st_size,
            int8_share=share,
            p50_ms=float(np.percentile(v.latencies_ms, 50)),
            p90_ms=float(np.percentile(v.latencies_ms, 90)),
            accuracy=float((predicted == y_eval).mean()),
            agreement=float((predicted == reference).mean()),
        )
    for v in variants:
        if v.session is not None:
            v.figures["size_ratio"] = fp32.figures["size_bytes"] / v.figures["size_bytes"]
            v.figures["latency_ratio"] = v.figures["p50_ms"] / fp32.figures["p50_ms"]
        v.session = None  # let ORT free it before the next model


def compare(name: str, work: Path, args) -> list[Variant]:
    model, calib, evaluation, x_eval, y_eval = build(name, work, args.seed)
    variants = [Variant("fp32", model), run_modelpress(model, calib, evaluation, args.quick),
                run_ort_dynamic(model)]
    for v in variants:
        open_session(v, args.threads, {zoo.INPUT: x_eval[:1]})
    measure(variants, x_eval, y_eval, args.runs, args.warmup)
    return variants


# --------------------------------------------------------------------------- reporting


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
    }


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


COLUMNS = ("model", "variant", "size KB", "x smaller", "int8 %", "p50 µs", "p90 µs",
           "p50 / fp32", "accuracy", "agree fp32", "note")


def rows(results: dict[str, list[Variant]]) -> list[list[str]]:
    table = []
    for name, variants in results.items():
        for v in variants:
            f = v.figures
            if v.status != "ok":
                table.append([name, v.label] + ["—"] * 8 + [v.status])
                continue
            table.append([
                name, v.label, f"{f['size_bytes'] / 1024:.0f}", f"{f['size_ratio']:.2f}",
                f"{100 * f['int8_share']:.0f}", f"{1000 * f['p50_ms']:.0f}",
                f"{1000 * f['p90_ms']:.0f}", f"{f['latency_ratio']:.2f}",
                f"{100 * f['accuracy']:.2f} %", f"{100 * f['agreement']:.1f} %", v.note,
            ])
    return table


def print_table(table: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(COLUMNS, *table)]
    for line in [COLUMNS, ["-" * w for w in widths], *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())


def markdown(table: list[list[str]], env: dict, command: str, args) -> str:
    isa = ", ".join(env["isa"]) or "none of " + ", ".join(ISA_FLAGS)
    lines = [
        BEGIN,
        "## modelpress `int8` vs ONNX Runtime `quantize_dynamic(per_channel=True)`",
        "",
        f"Generated by `benchmarks/compare_int8.py` on {datetime.date.today().isoformat()} "
        f"(commit {env['commit']}):",
        "",
        "```",
        command,
        "```",
        "",
        f"- Machine: {env['cpu']}, {env['cores']} cores, ISA: {isa}; "
        f"1-minute load average at start {env['load_avg_1m']:.2f} (a shared machine: read the "
        "ratios, which interleaving keeps fair, more than the absolute times).",
        f"- Software: onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, torch {env['torch']}, "
        f"Python {env['python']}.",
        f"- Timing: batch 1, {args.threads} intra-op threads, {args.warmup} warm-up + {args.runs} "
        f"timed runs per variant, the three sessions {TURNS}, in one process.",
        f"- Accuracy: the 450 held-out digits; modelpress calibrates on {CALIBRATION_SAMPLES} "
        "training digits. *x smaller* = fp32 file size / file size; *int8 %* = share of stored "
        "tensor bytes that are 8-bit integers; *agree fp32* = argmax agreement with fp32.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table),
        END,
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.ZOO),
                        help=f"comma-separated subset of {', '.join(zoo.ZOO)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="200 timed runs and 10 warm-ups instead of 1000 and 50")
    parser.add_argument("--runs", type=int, help="timed runs per variant (overrides --quick)")
    parser.add_argument("--warmup", type=int, help="warm-up runs per variant")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="keep the models and reports here")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to refresh")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--json", type=Path, help="also write the raw figures as JSON")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in zoo.ZOO]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(zoo.ZOO)}")
    args.runs = args.runs or (200 if args.quick else 1000)
    args.warmup = args.warmup if args.warmup is not None else (10 if args.quick else 50)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python " + shlex.join(
        [os.path.relpath(__file__, REPO), *(sys.argv[1:] if argv is None else argv)])
    env = machine()
    with tempfile.TemporaryDirectory(prefix="compare_int8_") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {}
        for name in args.models:
            print(f"[{name}] building, compressing, timing ...", file=sys.stderr, flush=True)
            results[name] = compare(name, work, args)
    table = rows(results)
    print_table(table)
    if args.json:
        args.json.write_text(json.dumps({
            "command": command, "environment": env,
            "results": {name: [{"variant": v.label, "status": v.status, "note": v.note, **v.figures}
                               for v in variants] for name, variants in results.items()},
        }, indent=2))
    if not args.no_write:
        replace_section(args.results, BEGIN, END, markdown(table, env, command, args))
        print(f"wrote {os.path.relpath(args.results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
