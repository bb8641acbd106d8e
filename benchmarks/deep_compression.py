"""The `deep-compression` recipe end to end with the CLI: shipped .mpk size vs the fp32 ONNX.

    python benchmarks/deep_compression.py                 # digits MLP and CNN
    python benchmarks/deep_compression.py --models mlp

For each digits model of examples/zoo.py (trained in seconds on scikit-learn's digits) this script
runs, as a subprocess,

    modelpress compress MODEL.onnx --recipe deep-compression --data TRAIN.npz --eval-data TEST.npz \\
        -o OUT.onnx --report-json OUT.json

with the 1347 training digits as `--data` (calibration, sensitivity and recovery) and the 450
held-out digits as `--eval-data`, then checks that `modelpress decode OUT.mpk` restores OUT.onnx
byte for byte and that stock onnxruntime runs it. Issue targets: MLP (64-300-100-10) >= 40x smaller
shipped with an accuracy drop <= 1 pp; CNN >= 30x, <= 1 pp. It prints one table plus the per-tensor
table of each report and replaces the `deep-compression` section of benchmarks/RESULTS.md.
Nothing here asserts: a missed target shows as `no` in the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))
import zoo
from entropy import command_line, replace_section, table

TARGETS = {"mlp": 40.0, "cnn": 30.0}
MAX_DROP_PP = 1.0


def run_model(name: str, work: Path) -> tuple[list[str], list[list[str]]]:
    model = {"mlp": zoo.build_mlp, "cnn": zoo.build_cnn}[name](work)
    x_train, y_train, x_test, y_test = zoo.digits_data()
    train = zoo.write_data(work / f"{name}-train.npz", zoo.model_input(name, x_train), y_train)
    test = zoo.write_data(work / f"{name}-test.npz", zoo.model_input(name, x_test), y_test)
    out, report_path = work / f"{name}.dc.onnx", work / f"{name}.dc.json"
    command = [sys.executable, "-m", "modelpress", "compress", str(model), "--recipe", "deep-compression",
               "--data", str(train), "--eval-data", str(test), "-o", str(out), "--report-json", str(report_path),
               "--quiet", "--force"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # exit 1 = a gate missed
    if done.returncode not in (0, 1):
        return [name, f"exit {done.returncode}: {done.stderr.strip()[-200:]}"] + [""] * 7, []
    report = json.loads(report_path.read_text())
    decoded = work / f"{name}.decoded.onnx"
    subprocess.run([sys.executable, "-m", "modelpress", "decode", str(out.with_suffix(".mpk")), "-o", str(decoded),
                    "--force"], check=True, capture_output=True)
    exact = decoded.read_bytes() == out.read_bytes()
    ort.InferenceSession(str(decoded), providers=["CPUExecutionProvider"])  # stock ORT runs it

    original, compressed = report["original"], report["compressed"]
    ratio = original["size_bytes"] / compressed["shipped_size_bytes"]
    drop = (original["metrics"]["accuracy"] - compressed["metrics"]["accuracy"]) * 100
    met = ratio >= TARGETS[name] and drop <= MAX_DROP_PP
    ladder = report.get("alternatives") or {}
    kept = f"{ladder.get('chosen')} ({ladder.get('index', 0) + 1} of {len(ladder.get('tried', []))})" if ladder else "-"
    row = [name, f"{original['size_bytes']:,}", f"{compressed['size_bytes']:,}", f"{compressed['shipped_size_bytes']:,}",
           f"{ratio:.1f}x (target {TARGETS[name]:g}x)", f"{original['metrics']['accuracy']:.4f} → "
           f"{compressed['metrics']['accuracy']:.4f} ({-drop + 0.0:+.2f} pp)", kept, "yes" if exact else "NO",
           "yes" if met else "no"]
    tensors = [[name, t["tensor"], f"{t['original_bytes'] or 0:,}", f"{t['runnable_bytes'] or 0:,}",
                ("~" if t["in_skeleton"] else "") + f"{t['shipped_bytes']:,}",
                "-" if t["sparsity"] is None else f"{t['sparsity']:.1%}", str(t["codebook_bits"] or "-"),
                "-" if t["bits_per_weight"] is None else f"{t['bits_per_weight']:.3f}"]
               for t in report.get("tensors", [])]
    return row, tensors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args(argv)

    rows, tensors = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            row, rows_of_tensors = run_model(name, Path(tmp))
            rows.append(row)
            tensors += rows_of_tensors
            print(" | ".join(row), flush=True)

    command = command_line("deep_compression.py", argv)
    body = "\n".join([
        "## `deep-compression` recipe: shipped size and accuracy",
        "",
        f"`{command}`: `modelpress compress MODEL --recipe deep-compression --data TRAIN --eval-data TEST` "
        "(1347 training digits / 450 held-out digits with labels), then `modelpress decode` of the .mpk.",
        "Sizes in bytes; *ratio* = fp32 ONNX / shipped .mpk; *kept* = the recipe's alternative whose gate "
        "held first (of those it lists); *decode exact* = the .mpk decodes to the "
        "runnable ONNX byte for byte; *target met* = ratio and accuracy drop <= 1 pp.",
        "",
        table(["model", "fp32 onnx", "runnable onnx", "shipped mpk", "ratio", "accuracy", "kept", "decode exact",
               "target met"], rows),
        "",
        "Per weight tensor (the report's table; `~` = includes its share of the compressed graph skeleton):",
        "",
        table(["model", "tensor", "original", "runnable", "shipped", "sparsity", "codebook bits", "bits/weight"],
              tensors),
    ])
    print(body)
    if not args.no_write:
        replace_section("deep-compression", body)


if __name__ == "__main__":
    main()
