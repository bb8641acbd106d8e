"""Attention heads behind Reshape targets computed at run time: torch's export with dynamic batch /
sequence axes builds them as Shape -> Gather -> Unsqueeze -> Concat with constant pieces (heads,
head_dim), as all-MiniLM-L6-v2's does. The heads are removed with the constant pieces rewritten and
the computed ones kept: the model passes the checker and runs at other sequence lengths, weights
shrink by the removed heads x head_dim, removing all-zero heads changes nothing, and targets that
are not understood are left alone with the reason."""

import math
import warnings

import numpy as np
import onnx
import pytest
from modelpress.compressors.model import to_bytes
from onnx import numpy_helper
from test_prune_structured import prune, run

torch = pytest.importorskip("torch")
pytest.importorskip("sympy")  # onnxruntime's symbolic shape inference needs it

D, HEADS, HEAD_DIM = 32, 4, 8
ZERO_HEAD = 1  # its q/k/v rows and o columns are all zero: removing it changes nothing


class Block(torch.nn.Module):
    """A BERT-like self-attention block: q/k/v projections split into heads, softmax attention,
    heads merged back, output projection, residual, LayerNorm.

    ``style``: "constant" — ``view(b, t, heads, head_dim)`` / ``reshape(b, t, heads * head_dim)``
    with the attention written out; "sdpa" — ``view(b, t, -1, head_dim)``, torch's
    ``scaled_dot_product_attention`` (its export reads head_dim by Shape -> Slice) and
    ``reshape(b, t, -1)``; "minilm" — what all-MiniLM-L6-v2's export shows: -1 heads, q and k
    scaled apart, a Softmax guarded by IsNaN -> Where, a same-rank ``reshape(b, -1, t, head_dim)``
    with t and head_dim read from q's and v's shapes, then the merge; "computed_heads" — the heads
    entry computed as ``size(-1) // head_dim``; "swapped" — ``view(t, b, ...)``, which is not a split
    of the channel axis alone."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.q, self.k, self.v, self.o = (torch.nn.Linear(D, D) for _ in range(4))
        self.norm = torch.nn.LayerNorm(D)
        rows = slice(ZERO_HEAD * HEAD_DIM, (ZERO_HEAD + 1) * HEAD_DIM)
        with torch.no_grad():
            for linear in (self.q, self.k, self.v):
                linear.weight[rows] = 0
                linear.bias[rows] = 0
            self.o.weight[:, rows] = 0

    def split(self, y, b, t):
        if self.style in ("sdpa", "minilm"):
            return y.view(b, t, -1, HEAD_DIM).transpose(1, 2)
        if self.style == "computed_heads":
            return y.view(b, t, y.size(-1) // HEAD_DIM, HEAD_DIM).transpose(1, 2)
        if self.style == "swapped":
            return y.view(t, b, HEADS, HEAD_DIM).transpose(1, 2)
        return y.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)

    def forward(self, x, mask):
        b, t = x.size(0), x.size(1)
        q, k, v = (self.split(proj(x), b, t) for proj in (self.q, self.k, self.v))
        bias = (1.0 - mask[:, None, None, :]) * -1e4 if self.style != "swapped" else mask.new_zeros(())
        if self.style == "sdpa":
            attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            merged = attended.transpose(1, 2).reshape(b, t, -1)
        elif self.style == "minilm":
            scale = HEAD_DIM ** -0.25
            weights = torch.softmax((q * scale) @ (k.transpose(-1, -2) * scale) + bias, dim=-1)
            weights = torch.where(torch.isnan(weights), torch.zeros(()), weights)
            attended = (weights @ v).reshape(b, -1, q.size(2), v.size(3))
            merged = attended.transpose(1, 2).reshape(b, t, -1)
        else:
            weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM) + bias, dim=-1)
            merged = (weights @ v).transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM)
        return self.norm(x + self.o(merged))


def exported(style: str, tmp_path) -> onnx.ModelProto:
    torch.manual_seed(0)
    block = Block(style).eval()
    path = tmp_path / f"{style}.onnx"
    x, mask = torch.zeros(2, 5, D), torch.ones(2, 5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(block, (x, mask), str(path), dynamo=False, opset_version=17, input_names=["x", "mask"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"},
                                                            "y": {0: "batch", 1: "seq"}})
    return onnx.load(path)


def feed(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.float32)
    mask[0, seq - 2:] = 0  # padding, as in a batch of sentences
    return {"x": rng.normal(size=(batch, seq, D)).astype(np.float32), "mask": mask}


FEEDS = [feed(2, 5, 1), feed(3, 9, 2)]  # two sequence lengths


def target_pieces(proto: onnx.ModelProto) -> list[list]:
    """Each Reshape's target as built by its Concat: constant pieces as ints, computed ones as '?'."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    constants = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    constants.update({node.output[0]: numpy_helper.to_array(node.attribute[0].t)
                      for node in proto.graph.node if node.op_type == "Constant"})
    targets = []
    for node in proto.graph.node:
        if node.op_type == "Reshape":
            concat = producers.get(node.input[1])
            assert concat is not None and concat.op_type == "Concat", "the export is expected to compute its targets"
            targets.append([int(constants[i].reshape(-1)[0]) if i in constants else "?" for i in concat.input])
    return targets


def weight_shapes(proto: onnx.ModelProto) -> list[tuple]:
    return sorted(tuple(init.dims) for init in proto.graph.initializer if len(init.dims) == 2)


@pytest.mark.parametrize("style, criteria", [("constant", ("l2", "activation")), ("sdpa", ("l2",)),
                                             ("minilm", ("activation",))])
def test_heads_behind_computed_targets_are_removed(style, criteria, tmp_path):
    proto = exported(style, tmp_path)
    before = target_pieces(proto)
    assert all("?" in target for target in before)  # batch and sequence come from Shape at run time
    if style == "minilm":
        assert {"IsNaN", "Where"} <= {node.op_type for node in proto.graph.node}
        assert ["?", -1, "?", "?"] in before  # the same-rank Reshape
    for criterion in criteria:
        result = prune(proto, tmp_path, FEEDS, ratio=0.0, head_ratio=0.25, criterion=criterion)
        assert result.stats["groups_pruned"] == 1, result.stats["skipped"]
        (kept,) = [v for k, v in result.stats["per_group"].items() if "units of 8" in k]
        assert kept == "3/4"
        pruned = onnx.load_from_string(to_bytes(result.model))
        onnx.checker.check_model(pruned, full_check=True)
        for inputs in FEEDS:  # the removed head is the all-zero one: nothing changes, at either length
            np.testing.assert_allclose(run(pruned, inputs), run(proto, inputs), atol=1e-5)
    # q, k, v lose 1 head x 8 output columns, o the matching 8 input rows (torch stores x @ W^T as MatMul W^T)
    assert weight_shapes(pruned) == sorted([(D, D - HEAD_DIM)] * 3 + [(D - HEAD_DIM, D)])
    after = target_pieces(pruned)
    if style == "constant":  # [b, t, heads, head_dim] x 3 and [b, t, heads * head_dim]
        assert sorted(before) == sorted([["?", "?", HEADS, HEAD_DIM]] * 3 + [["?", "?", D]])
        assert sorted(after) == sorted([["?", "?", HEADS - 1, HEAD_DIM]] * 3 + [["?", "?", D - HEAD_DIM]])
    else:  # -1 entries are left for onnxruntime to infer
        assert after == before and any(-1 in target for target in after)


def test_nothing_removed_is_exact_and_removing_real_heads_runs(tmp_path):
    proto = exported("minilm", tmp_path)
    same = prune(proto, tmp_path, FEEDS, ratio=0.0, head_ratio=0.0)
    assert not same.modified
    for inputs in FEEDS:
        np.testing.assert_allclose(run(same.model, inputs), run(proto, inputs), atol=1e-5)
    half = prune(proto, tmp_path, FEEDS, ratio=0.0, head_ratio=0.5, criterion="l2")
    assert list(half.stats["per_group"].values()).count("2/4") == 1
    pruned = onnx.load_from_string(to_bytes(half.model))
    assert weight_shapes(pruned) == sorted([(D, D // 2)] * 3 + [(D // 2, D)])
    for inputs in FEEDS:  # a real (non-zero) head is gone: outputs differ, but have the right shape
        out = run(pruned, inputs)
        assert out.shape == inputs["x"].shape and np.isfinite(out).all()
        assert np.abs(out - run(proto, inputs)).max() > 1e-3


@pytest.mark.parametrize("style, reason", [
    ("computed_heads", "the channel count of"),  # size(-1) // head_dim reads it
    ("swapped", "neither flattens, splits, merges nor keeps the channel axis"),
])
def test_targets_not_understood_are_left_alone(style, reason, tmp_path):
    proto = exported(style, tmp_path)
    result = prune(proto, tmp_path, FEEDS, ratio=0.5, head_ratio=0.5)
    assert not result.modified
    reasons = [s["reason"] for s in result.stats["skipped"]]
    assert any(reason in r for r in reasons), reasons


def test_a_target_shared_by_q_and_k_is_rewritten_for_each(tmp_path):
    """Exporters may build one target for several Reshapes: each pruned Reshape gets a correct one."""
    proto = exported("constant", tmp_path)
    reshapes = [node for node in proto.graph.node if node.op_type == "Reshape"]
    reshapes[1].input[1] = reshapes[0].input[1]  # k's split reads q's Concat (the same [b, t, 4, 8])
    onnx.checker.check_model(proto)
    result = prune(proto, tmp_path, FEEDS, ratio=0.0, head_ratio=0.25)
    pruned = onnx.load_from_string(to_bytes(result.model))
    assert sorted(target_pieces(pruned)) == sorted([["?", "?", HEADS - 1, HEAD_DIM]] * 3 + [["?", "?", D - HEAD_DIM]])
    for inputs in FEEDS:
        np.testing.assert_allclose(run(pruned, inputs), run(proto, inputs), atol=1e-5)
