"""Shipped recipes on a real pretrained speaker encoder: Resemblyzer's VoiceEncoder, from its PyPI wheel.

    pip install --no-deps Resemblyzer==0.1.4                 # once, beforehand
    python benchmarks/voice_encoder.py                       # the default recipes
    python benchmarks/voice_encoder.py --recipes int8,fp16 --no-ort --no-write

The model is Resemblyzer's encoder (GE2E-trained): a 3-layer LSTM (40 mel channels in, 256 hidden)
whose last layer's final hidden state goes through Linear(256, 256) and ReLU and is L2-normalized, a
256-d speaker embedding per utterance of 160 frames. Its output is a feature vector, not class scores,
so the CLI judges it by cosine, not argmax. Nothing is downloaded: the weights are the wheel's
`resemblyzer/pretrained.pt`, found through its installed location without importing the package (it
would pull in webrtcvad and librosa), so `--no-deps` is enough; a missing wheel exits 2 with the pip line.

This script
1. rebuilds the encoder in torch, loads those weights and exports it to ONNX (opset 17, input `mels`
   [N, 160, 40], output `embedding` [N, 256], batch dynamic),
2. writes 48 seeded synthetic log-mel-like utterances in [0, 1] (a smooth spectral envelope times
   harmonic ridges that drift over time times a slow amplitude modulation, plus noise): the first 32
   are `--data`, the last 16 `--eval-data` (held out, what the report measures),
3. runs `modelpress compress MODEL --recipe R --data DATA --eval-data EVAL ...` as a subprocess per
   recipe and reads its report (exit code, size and p50 latency against the original, fidelity),
4. runs onnxruntime's `quantize_dynamic` (default settings, per_channel=False) as a comparison row,
   timed and judged on the held-out utterances as benchmarks/thirdparty.py does.

It prints one table and replaces the `voice-encoder` section of benchmarks/RESULTS.md. It is a
benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import common  # noqa: E402
import compare_int8  # noqa: E402
import thirdparty  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- voice-encoder:begin -->", "<!-- voice-encoder:end -->"
PIP = "pip install --no-deps Resemblyzer==0.1.4"
NAME = "voice-encoder"
RECIPES = "int8,int8-static,fp16,sparse-50,structured-50,deep-compression,prune-int8"
FRAMES, MELS, SAMPLES, HELD_OUT = 160, 40, 48, 16
# thirdparty's columns but agreement: an embedding has no argmax to agree on
COLUMNS = tuple(c for c in thirdparty.COLUMNS if c != "agreement")
AGREEMENT = thirdparty.COLUMNS.index("agreement")


def export(weights: Path, out: Path) -> Path:
    """Resemblyzer's VoiceEncoder with the wheel's weights, as ONNX."""
    import torch
    from torch import nn

    class VoiceEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(MELS, 256, 3, batch_first=True)
            self.linear = nn.Linear(256, 256)

        def forward(self, mels):
            _, (hidden, _) = self.lstm(mels)
            embeds = torch.relu(self.linear(hidden[-1]))
            return embeds / torch.norm(embeds, dim=1, keepdim=True)

    state = torch.load(weights, map_location="cpu", weights_only=False)
    state = state.get("model_state", state)
    model = VoiceEncoder()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity")})
    model.eval()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, FRAMES, MELS),), str(out), input_names=["mels"],
                          output_names=["embedding"], dynamic_axes={"mels": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return out


def utterances(seed: int) -> np.ndarray:
    """[SAMPLES, FRAMES, MELS] float32 in [0, 1]: envelope exp(-k/r) x ridges 0.5 + 0.5 cos(2 pi k/f0 +
    0.05 t u) x modulation 0.6 + 0.4 sin(t/s), plus N(0, 0.02), clipped (k: mel channel, t: frame)."""
    rng = np.random.default_rng(seed)
    t, k = np.arange(FRAMES)[:, None], np.arange(MELS)[None, :]
    x = []
    for _ in range(SAMPLES):
        r, f0, u, s = rng.uniform(8, 20), rng.uniform(3, 9), rng.uniform(-1, 1), rng.uniform(5, 15)
        frames = np.exp(-k / r) * (0.5 + 0.5 * np.cos(2 * np.pi * k / f0 + 0.05 * t * u)) * (0.6 + 0.4 * np.sin(t / s))
        x.append(np.clip(frames + rng.normal(0, 0.02, frames.shape), 0, 1))
    return np.stack(x).astype(np.float32)


def prepare(weights: Path, work: Path, seed: int) -> tuple[Path, Path, Path, list[dict]]:
    """In ``work``: the exported model, the --data and --eval-data files; and the held-out utterances
    as batch-1 feeds for the ORT row."""
    work.mkdir(parents=True, exist_ok=True)
    print(f"[{NAME}] exporting {weights} ...", file=sys.stderr, flush=True)
    model = export(weights, work / "voice_encoder.onnx")
    x = utterances(seed)
    np.savez(data := work / "data.npz", mels=x[:-HELD_OUT])
    np.savez(evaluation := work / "eval.npz", mels=x[-HELD_OUT:])
    return model, data, evaluation, [{"mels": x[i:i + 1]} for i in range(SAMPLES - HELD_OUT, SAMPLES)]


def table_rows(results: dict[str, list[dict]]) -> list[list[str]]:
    return [row[:AGREEMENT] + row[AGREEMENT + 1:] for row in thirdparty.table_rows(results)]


def markdown(table, env: dict, command: str, args) -> str:
    vnni = any("vnni" in flag for flag in env["isa"])
    lines = [
        *common.section_head(BEGIN, "Resemblyzer's speaker encoder (pretrained, from its PyPI wheel)",
                             "voice_encoder.py", env, [f"{PIP}   # beforehand", command],
                             "" if vnni else " (no VNNI: int8 kernels gain little)"),
        f"- Software: onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, torch {env['torch']}.",
        ("- Model: Resemblyzer 0.1.4's VoiceEncoder with the wheel's `resemblyzer/pretrained.pt`: a 3-layer LSTM "
         "(40 mel channels, 256 hidden) whose final hidden state goes through Linear(256, 256), ReLU and L2 "
         "normalization, a 256-d speaker embedding per 160-frame utterance; exported here with "
         "`torch.onnx.export` (opset 17, batch dynamic)."),
        (f"- Data: **synthetic** (seed {args.seed}), {SAMPLES} log-mel-like utterances [160, 40] in [0, 1]: a smooth "
         "spectral envelope exp(-k/r) times harmonic ridges drifting over time times a slow amplitude "
         f"modulation, plus N(0, 0.02) noise. The first {SAMPLES - HELD_OUT} are `--data`, the last {HELD_OUT} "
         "`--eval-data` (held out). There are no labels (no speakers): fidelity is to the original, as the CLI "
         "judges an embedding: the mean per-sample cosine of the L2-normalized embedding."),
        ("- modelpress rows: `modelpress compress MODEL --recipe R --data DATA --eval-data EVAL -o OUT "
         f"--report-json R.json --quiet --force` (timeout {args.timeout} s), figures from its report (latency: the "
         "CLI's batch-1 p50, the two models in turns). ORT row: `quantize_dynamic(per_channel=False)` with default "
         f"settings, timed here the same way on the held-out utterances ({args.threads} threads, {args.warmup} "
         f"warm-ups, {args.runs} runs, {compare_int8.TURNS}). Exit 0 ok, 1 gate missed (outputs written and "
         "measured), 2 bad input, 3 internal fault (note: the last stderr line)."),
        "",
        *common.markdown_table(COLUMNS, table),
        END,
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = common.sweep_parser(__doc__.splitlines()[0], NAME, RECIPES, 1200, RESULTS)
    thirdparty.add_ort_options(parser)
    args = parser.parse_args(argv)
    command = common.command_line(__file__, REPO, argv)
    if common.names(args.models) != [NAME]:
        print(f"error: this script has one model, {NAME}", file=sys.stderr)
        return 2
    try:
        weights = thirdparty.locate("resemblyzer", "pretrained.pt")
    except FileNotFoundError as missing:
        print(f"error: {missing} not found; install the wheel first:\n  {PIP}", file=sys.stderr)
        return 2
    env = None if args.no_write else compare_int8.machine()  # as classic_zoo.py: only the section uses it
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="voice_encoder_") as tmp:
        model, data, evaluation, feeds = prepare(weights, args.work_dir or Path(tmp), args.seed)
        save = None if args.no_write else lambda: common.replace_section(  # noqa: E731
            args.results, BEGIN, END, markdown(table_rows(results), env, command, args))
        common.run_recipes(results, NAME, model, common.names(args.recipes), data, model.parent, args.timeout,
                           lambda row: " | ".join(table_rows({NAME: [row]})[0][2:]), save, evaluation)
        if not args.no_ort:
            print(f"[{NAME}] ORT quantize_dynamic ...", file=sys.stderr, flush=True)
            results[NAME].append(thirdparty.run_ort_dynamic(model, feeds, model.parent, args))
    print(common.text_table(COLUMNS, table_rows(results)))
    if not args.no_write:
        common.replace_section(args.results, BEGIN, END, markdown(table_rows(results), env, command, args))
        print(f"wrote {os.path.relpath(args.results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
