"""`structured-50` on the digits CNN and MLP: latency, runnable size and accuracy against the original.

    python benchmarks/structured.py                     # cnn and mlp, 2000 timed runs each
    python benchmarks/structured.py --models cnn,mlp,transformer
    python benchmarks/structured.py --models cnn --runs 300

For each zoo model (examples/zoo.py, trained in seconds on scikit-learn's digits) this script
1. builds the fp32 model, ``train.npz`` (the 1347 training digits with labels) and ``test.npz`` (the
   450 held-out digits with labels),
2. runs `modelpress compress MODEL --recipe structured-50 --data train.npz --eval-data test.npz`
   as a subprocess (structured pruning of half the channels / units, then distillation),
3. times the original and the pruned model in this one process taking turns of back-to-back runs
   (the order alternates every round, batch 1 and batch 64, warm-up first; the timing code is
   compare_int8.py's), and measures file size, parameters and held-out accuracy.

Issue 4's targets on the CNN: latency <= 0.75x, runnable size <= 0.55x, accuracy drop <= 1 pp.
It prints one table and replaces the `structured` section of benchmarks/RESULTS.md. It is a
benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import compare_int8 as common
from compare_int8 import Variant, zoo
from common import replace_section

RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- structured:begin -->", "<!-- structured:end -->"
TARGETS = {"latency": 0.75, "size": 0.55, "drop_pp": 1.0}


def build(name: str, work: Path, seed: int):
    x_train, y_train, x_test, y_test = zoo.digits_data(seed)
    model = zoo.ZOO[name].build(work, seed=seed)
    train = zoo.write_data(work / f"{name}.train.npz", zoo.model_input(name, x_train), y_train)
    test = zoo.write_data(work / f"{name}.test.npz", zoo.model_input(name, x_test), y_test)
    return model, train, test, zoo.model_input(name, x_test), y_test


def compress(model: Path, train: Path, test: Path) -> Variant:
    out = model.with_name(model.stem + ".structured-50.onnx")
    report = out.with_suffix(".json")
    variant = Variant("structured-50", out)
    command = [sys.executable, "-m", "modelpress", "compress", str(model), "--recipe", "structured-50",
               "--data", str(train), "--eval-data", str(test), "--output", str(out),
               "--report-json", str(report), "--force", "--quiet", "--runs", "10", "--warmup", "2"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    variant.figures["compress_s"] = time.perf_counter() - start
    if done.returncode not in (0, 1) or not out.exists():
        variant.status = f"failed (exit {done.returncode}): {common.cli_error(done.stderr or done.stdout)}"
        return variant
    if done.returncode == 1:
        variant.note = "a recipe gate missed"
    passes = json.loads(report.read_text())["passes"]
    stats = next(p["stats"] for p in passes if p["name"] == "structured")
    variant.figures["groups"] = stats["per_group"]
    variant.figures["recover"] = next((p["stats"].get("agreement_after") for p in passes if p["name"] == "recover"), None)
    return variant


def parameters(path: Path) -> int:
    return sum(int(np.prod(t.dims)) for t in common.tensors(onnx.load(path).graph))


def measure(variants: list[Variant], x_eval: np.ndarray, y_eval: np.ndarray, args) -> None:
    original = variants[0]
    for batch in (1, 64):
        feeds = [{zoo.INPUT: x_eval[i:i + batch]} for i in range(0, min(len(x_eval), 64 * batch), batch)]
        feeds = [f for f in feeds if len(f[zoo.INPUT]) == batch]
        for v in variants:
            v.latencies_ms = []
        runs = args.runs if batch == 1 else max(50, args.runs // 10)
        common.time_interleaved(variants, feeds, runs, args.warmup)
        for v in variants:
            if v.session is not None:
                v.figures[f"p50_b{batch}_ms"] = float(np.percentile(v.latencies_ms, 50))
    for v in variants:
        if v.session is None:
            continue
        predicted = v.session.run(None, {zoo.INPUT: x_eval})[0].argmax(axis=1)
        v.figures.update(size_bytes=v.path.stat().st_size, parameters=parameters(v.path),
                         accuracy=float((predicted == y_eval).mean()))
    for v in variants:
        if v.session is not None:
            f, o = v.figures, original.figures
            f["size_ratio"] = f["size_bytes"] / o["size_bytes"]
            f["latency_b1"] = f["p50_b1_ms"] / o["p50_b1_ms"]
            f["latency_b64"] = f["p50_b64_ms"] / o["p50_b64_ms"]
            f["drop_pp"] = 100 * (o["accuracy"] - f["accuracy"])
        v.session = None


COLUMNS = ("model", "variant", "size KB", "size / orig", "parameters", "p50 b1 µs", "b1 / orig",
           "p50 b64 µs", "b64 / orig", "accuracy", "drop pp", "channels kept", "note")


def rows(results: dict[str, list[Variant]]) -> list[list[str]]:
    table = []
    for name, variants in results.items():
        for v in variants:
            f = v.figures
            if v.status != "ok":
                table.append([name, v.label] + ["—"] * 10 + [v.status])
                continue
            groups = ", ".join(f"{k}: {g}" for k, g in f.get("groups", {}).items())
            table.append([name, v.label, f"{f['size_bytes'] / 1024:.1f}", f"{f['size_ratio']:.3f}",
                          str(f["parameters"]), f"{1000 * f['p50_b1_ms']:.1f}", f"{f['latency_b1']:.3f}",
                          f"{1000 * f['p50_b64_ms']:.0f}", f"{f['latency_b64']:.3f}",
                          f"{100 * f['accuracy']:.2f} %", f"{f['drop_pp']:.2f}", groups, v.note])
    return table


def markdown(table: list[list[str]], env: dict, command: str, args) -> str:
    isa = ", ".join(env["isa"]) or "none"
    lines = [
        BEGIN,
        "## `structured-50`: structured pruning + distillation on the digits zoo models",
        "",
        f"Generated by `benchmarks/structured.py` on {datetime.date.today().isoformat()} (commit {env['commit']}):",
        "",
        "```",
        command,
        "```",
        "",
        (f"- Machine: {env['cpu']}, {env['cores']} cores, ISA: {isa}; 1-minute load average at start "
         f"{env['load_avg_1m']:.2f} (shared machine: the paired ratios are the figures to read)."),
        f"- Software: onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, torch {env['torch']}.",
        ("- Compress: `modelpress compress MODEL --recipe structured-50 --data train.npz --eval-data test.npz` "
         "(1347 training digits calibrate and teach; accuracy on the 450 held-out digits)."),
        (f"- Timing: {args.threads} intra-op threads, {args.warmup} warm-ups, {args.runs} timed runs at batch 1 "
         f"and {max(50, args.runs // 10)} at batch 64, the two sessions {common.TURNS}."),
        (f"- Issue 4 targets (CNN): latency <= {TARGETS['latency']}x, runnable size <= {TARGETS['size']}x, "
         f"accuracy drop <= {TARGETS['drop_pp']} pp."),
        ("- The recipe keeps attention heads (`head_ratio: 0`): removing 1 of the transformer's 4 heads per "
         "layer cost 1.6 pp after recovery; its FFN units are halved."),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in table),
        END,
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated zoo models (default cnn,mlp)")
    parser.add_argument("--runs", type=int, default=2000, help="timed batch-1 runs per model variant")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="keep the models and reports here")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args(argv)
    command = "python " + shlex.join([os.path.relpath(__file__, REPO), *(sys.argv[1:] if argv is None else argv)])
    env = common.machine()
    results = {}
    with tempfile.TemporaryDirectory(prefix="structured_") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            print(f"[{name}] building, compressing, timing ...", file=sys.stderr, flush=True)
            model, train, test, x_eval, y_eval = build(name, work, args.seed)
            variants = [Variant("original", model), compress(model, train, test)]
            for v in variants:
                common.open_session(v, args.threads, {zoo.INPUT: x_eval[:1]})
            measure(variants, x_eval, y_eval, args)
            results[name] = variants
    table = rows(results)
    widths = [max(len(str(c)) for c in col) for col in zip(COLUMNS, *table)]
    for line in [COLUMNS, ["-" * w for w in widths], *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    if not args.no_write:
        replace_section(args.results, BEGIN, END, markdown(table, env, command, args))
        print(f"wrote {os.path.relpath(args.results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
