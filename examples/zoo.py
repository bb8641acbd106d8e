"""Small real models for tests and benchmarks, trained in seconds on scikit-learn's bundled digits.

Every builder trains a model from a seed, exports it to ONNX in ``out_dir`` and returns the path. No
downloads and no global caches: the same call writes a byte-identical file. Each model has one input
named ``input`` with a dynamic batch axis and one output ``logits`` (10 classes).

    import sys; sys.path.insert(0, "examples")
    import zoo
    path = zoo.build_mlp(tmp_dir)
    x_train, y_train, x_test, y_test = zoo.digits_data()
    zoo.write_data(tmp_dir / "digits.npz", x_test, y_test)

The models cover the awkward corners of real ONNX files, each named after what it exercises:

=================  ==========================================================================
``mlp``            Gemm layers (64-300-100-10), opset 17, input [batch, 64]
``cnn``            Conv + unfolded BatchNormalization + MaxPool + Gemm, input [batch, 1, 8, 8]
``transformer``    Gather token embedding, MatMul attention, LayerNormalization, Erf GELU
``constant_cnn``   the CNN at opset 11 with every weight a ``Constant`` node (paddle2onnx style)
``if_model``       the MLP's weights inside both branches of an ``If`` node
=================  ==========================================================================

``ZOO`` maps these names to their builders and to the layout of their input; ``model_input``
reshapes the flat digits to that layout.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

OPSET = 17
CONSTANT_OPSET = 11
INPUT = "input"
OUTPUT = "logits"
CLASSES = 10
SEQ = 8  # an 8x8 image is read as a sequence of 8 row tokens of 8 pixels each


# --------------------------------------------------------------------------- data


def digits_data(seed: int = 0, test_fraction: float = 0.25):
    """Digits as ``(x_train, y_train, x_test, y_test)``: x float32 [n, 64] in [0, 1], y int64.

    The split is stratified and depends only on ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


def write_data(path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    """Write the ``--data`` file: ``x`` under the model's input name, optional int64 ``labels``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {INPUT: np.ascontiguousarray(x, dtype=np.float32)}
    if y is not None:
        arrays["labels"] = np.asarray(y, dtype=np.int64)
    # Compressed: the pixels take 17 levels, so the demo file stays small enough to commit.
    np.savez_compressed(path, **arrays)
    return path


# --------------------------------------------------------------------------- torch models


class MLP(nn.Module):
    def __init__(self, hidden=(300, 100)):
        super().__init__()
        layers, width = [], 64
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, CLASSES))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(64 * 4 * 4, CLASSES)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class EncoderLayer(nn.Module):
    """Pre-norm encoder layer with attention written as MatMuls, so the export shows them as such."""

    def __init__(self, d=64, heads=4, ffn=256):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

    def forward(self, x):
        h = self.norm1(x)
        # Static shapes (the sequence is always 8 rows) keep Shape/Gather chains out of the graph.
        q, k, v = (proj(h).reshape(-1, SEQ, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(-1, SEQ, self.heads * self.head_dim)
        x = x + self.proj(attended)
        return x + self.ffn(self.norm2(x))


class Transformer(nn.Module):
    """Rows as tokens: each row is both projected (Linear 8 -> d) and looked up in a 256-entry
    embedding by its binarized pixel pattern, so the export has a data-dependent Gather embedding."""

    def __init__(self, d=96, layers=2, heads=4, ffn=384):
        super().__init__()
        self.row_proj = nn.Linear(SEQ, d)
        self.token_embedding = nn.Embedding(2**SEQ, d)
        # BERT-style small init: at torch's default N(0, 1) the lookup drowns the row projection
        # and the model memorizes patterns (test accuracy 88 % instead of 97 %).
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.position = nn.Parameter(torch.zeros(SEQ, d))
        self.layers = nn.ModuleList(EncoderLayer(d, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, CLASSES)
        self.register_buffer("bit_values", 2 ** torch.arange(SEQ, dtype=torch.float32))

    def forward(self, x):
        rows = x.reshape(-1, SEQ, SEQ)
        token_ids = ((rows > 0.5).float() @ self.bit_values).long()
        h = self.row_proj(rows) + self.token_embedding(token_ids) + self.position
        for layer in self.layers:
            h = layer(h)
        return self.classifier(self.norm(h).mean(dim=1))


# --------------------------------------------------------------------------- training / export


@contextlib.contextmanager
def _torch_settings(seed: int) -> Iterator[None]:
    """One thread and a fixed seed for the duration of a build; the caller's settings come back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int, lr: float,
           batch: int = 64, weight_decay: float = 0.0) -> nn.Module:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * -(-len(xt) // batch)
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=generator).split(batch):
            optimizer.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def model_input(name: str, x: np.ndarray) -> np.ndarray:
    """Flat digits [n, 64] reshaped to the input layout of zoo model ``name``."""
    return x.reshape(ZOO[name].input_shape(len(x))).astype(np.float32)


def _export(model: nn.Module, example: torch.Tensor, path: Path, opset: int = OPSET,
            *, fold_batchnorm: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The legacy (TorchScript) exporter: deterministic, names nodes after modules, no onnxscript
    # rewriting. It still exists in torch 2.13 behind dynamo=False, with a deprecation warning.
    # TrainingMode.PRESERVE on an eval-mode model keeps BatchNormalization as a node (as many real
    # exports ship it); EVAL would fold it into the Conv.
    training = torch.onnx.TrainingMode.EVAL if fold_batchnorm else torch.onnx.TrainingMode.PRESERVE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            training=training, do_constant_folding=True,
        )
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    return path


def _train_mlp(seed: int, hidden) -> MLP:
    x_train, y_train, _, _ = digits_data(seed)
    return _train(MLP(hidden), x_train, y_train, seed=seed, epochs=30, lr=3e-3)


def _train_cnn(seed: int) -> CNN:
    x_train, y_train, _, _ = digits_data(seed)
    return _train(CNN(), model_input("cnn", x_train), y_train, seed=seed, epochs=15, lr=5e-3)


# --------------------------------------------------------------------------- builders


def build_mlp(out_dir, hidden=(300, 100), seed: int = 0) -> Path:
    """64-300-100-10 ReLU MLP (Gemm nodes), opset 17, input [batch, 64]."""
    with _torch_settings(seed):
        model = _train_mlp(seed, hidden)
        return _export(model, torch.zeros(1, 64), Path(out_dir) / "digits-mlp.onnx")


def build_cnn(out_dir, seed: int = 0) -> Path:
    """Conv-BN-ReLU x2, MaxPool, Linear; BatchNormalization left unfolded. Input [batch, 1, 8, 8]."""
    with _torch_settings(seed):
        model = _train_cnn(seed)
        return _export(model, torch.zeros(1, 1, 8, 8), Path(out_dir) / "digits-cnn.onnx",
                       fold_batchnorm=False)


def build_transformer(out_dir, seed: int = 0) -> Path:
    """2-layer pre-norm encoder (d=96, 4 heads, FFN 384) over 8 row tokens. Input [batch, 64].

    The token ids come from a MatMul of the binarized rows with a 1-D weight (the bit values 1..128),
    which a quantizer must leave exact: rounding it changes which embedding rows are gathered."""
    with _torch_settings(seed):
        x_train, y_train, _, _ = digits_data(seed)
        model = _train(Transformer(), x_train, y_train, seed=seed, epochs=25, lr=3e-3,
                       weight_decay=0.01)
        return _export(model, torch.zeros(1, 64), Path(out_dir) / "digits-transformer.onnx")


def build_constant_cnn(out_dir, seed: int = 0) -> Path:
    """The CNN at opset 11 (BatchNorm folded) with every initializer turned into a Constant node."""
    path = Path(out_dir) / "digits-constant-cnn.onnx"
    with _torch_settings(seed):
        _export(_train_cnn(seed), torch.zeros(1, 1, 8, 8), path, CONSTANT_OPSET)
    model = onnx.load(path)
    graph = model.graph
    constants = [
        helper.make_node("Constant", [], [init.name], name=f"{init.name}_constant", value=init)
        for init in graph.initializer
    ]
    del graph.initializer[:]
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return _save_checked(model, path)


def build_if_model(out_dir, seed: int = 0) -> Path:
    """The MLP's layers inside both branches of an If on ``ReduceSum(input) > -1`` (always true for
    pixels in [0, 1]). Each branch holds its own copy of the weights as subgraph initializers."""
    with _torch_settings(seed):
        mlp = _train_mlp(seed, (300, 100))
    linears = [m for m in mlp.layers if isinstance(m, nn.Linear)]

    def branch(prefix: str) -> onnx.GraphProto:
        nodes, inits, h = [], [], INPUT
        for i, linear in enumerate(linears):
            w, b = f"{prefix}_fc{i}_weight", f"{prefix}_fc{i}_bias"
            inits += [numpy_helper.from_array(linear.weight.detach().numpy(), w),
                      numpy_helper.from_array(linear.bias.detach().numpy(), b)]
            out = f"{prefix}_fc{i}" if i < len(linears) - 1 else f"{prefix}_logits"
            nodes.append(helper.make_node("Gemm", [h, w, b], [out], name=f"{prefix}/fc{i}", transB=1))
            if i < len(linears) - 1:
                nodes.append(helper.make_node("Relu", [out], [f"{out}_relu"], name=f"{prefix}/relu{i}"))
                out = f"{out}_relu"
            h = out
        logits = helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", CLASSES])
        return helper.make_graph(nodes, f"{prefix}_branch", [], [logits], initializer=inits)

    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", [INPUT], ["pixel_sum"], name="pixel_sum", keepdims=0),
            helper.make_node("Constant", [], ["threshold"], name="threshold",
                             value=numpy_helper.from_array(np.array(-1.0, np.float32))),
            helper.make_node("Greater", ["pixel_sum", "threshold"], ["use_then"], name="condition"),
            helper.make_node("If", ["use_then"], [OUTPUT], name="branch",
                             then_branch=branch("then"), else_branch=branch("else")),
        ],
        "digits_if_mlp",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", CLASSES])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="modelpress-zoo")
    return _save_checked(model, Path(out_dir) / "digits-if-mlp.onnx")


def _save_checked(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ZooEntry:
    build: Callable[..., Path]
    image: bool  # True: input [n, 1, 8, 8]; False: input [n, 64]
    min_accuracy: float  # held-out floor the builder is tested against

    def input_shape(self, n: int) -> tuple[int, ...]:
        return (n, 1, 8, 8) if self.image else (n, 64)


ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(build_mlp, image=False, min_accuracy=0.96),
    "cnn": ZooEntry(build_cnn, image=True, min_accuracy=0.95),
    "transformer": ZooEntry(build_transformer, image=False, min_accuracy=0.90),
    "constant_cnn": ZooEntry(build_constant_cnn, image=True, min_accuracy=0.95),
    "if_model": ZooEntry(build_if_model, image=False, min_accuracy=0.96),
}


def accuracy(model_path, x: np.ndarray, y: np.ndarray, threads: int = 1) -> float:
    """Top-1 accuracy of an ONNX zoo model under onnxruntime's CPU provider (x already shaped)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(axis=1) == y).mean())
