"""Nearest-neighbour agreement of MiniLM-style sentence embeddings, split by how decisive fp32's choice is.

    python benchmarks/nn_margins.py FP32.onnx OTHER.onnx... --data evaluation.npz

For each evaluation sentence, fp32's nearest other sentence (by cosine of the mean-pooled embeddings,
as `benchmarks/minilm.py` measures agreement) leads its runner-up by some margin. Where that margin
is a few thousandths, any model that is not bit-identical flips the choice about as often as a coin;
this prints the agreement of each model over all sentences and over those whose fp32 margin is at least
each of MARGINS, so a miss can be told apart from a near-tie. Prints only; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm
from common import text_table

MARGINS = (0.0, 0.005, 0.01, 0.02, 0.05)


def margins(embeddings: np.ndarray) -> np.ndarray:
    """Per sentence: cosine to its nearest other sentence minus cosine to the second nearest."""
    top = -np.sort(-minilm.neighbour_similarities(embeddings), axis=1)[:, :2]
    return top[:, 0] - top[:, 1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="the fp32 model first, then the models to compare")
    parser.add_argument("--data", type=Path, required=True, help="evaluation .npz (input_ids, attention_mask, token_type_ids)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from modelpress.compressors.benchmark import make_session

    data = dict(np.load(args.data))
    embeddings = [minilm.sentence_embeddings(make_session(m, args.threads), data) for m in args.models]
    lead = margins(embeddings[0])
    reference = minilm.nearest_neighbours(embeddings[0])
    columns = ["model", *(f"margin >= {m:g} (n={int((lead >= m).sum())})" for m in MARGINS)]
    rows = []
    for model, emb in zip(args.models[1:], embeddings[1:]):
        agree = minilm.nearest_neighbours(emb) == reference
        rows.append([model.name, *(f"{agree[lead >= m].mean():.1%}" for m in MARGINS)])
    print(text_table(columns, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
