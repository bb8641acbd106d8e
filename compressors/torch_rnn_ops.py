"""ONNX recurrent ops (LSTM, GRU) as torch functions, step by step, so `recover` can train CRNN and
voice-activity models (PP-OCR's and ddddocr's recognizers, silero-vad).

ONNX's layout: X [seq, batch, input]; W [dirs, gates·H, input],
R [dirs, gates·H, H], B [dirs, 2·gates·H] (input then recurrence biases); gates in ONNX order — LSTM
i, o, f, c; GRU z, r, h. Outputs Y [seq, dirs, batch, H] and the last state(s) [dirs, batch, H].
Supported: the default activations, forward / reverse / bidirectional, initial states, LSTM
peepholes, every sequence at full length. Clipping, ``input_forget``, ``layout=1``, other
activations (``CHECKS``) and shorter ``sequence_lens`` (at run time) are refused by name, never run
wrongly.
"""

from __future__ import annotations

from typing import Any

import torch

from modelpress.compressors.torch_ops import CHECKS, Call, Tensor, UnsupportedCase, op


def _directions(call: Call) -> list[bool]:
    """One entry per direction: True where it runs backwards in time."""
    return {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[call.attr("direction", "forward")]


def _check_lengths(call: Call, x: Tensor, lengths: Tensor | None) -> None:
    """Shorter sequences would need per-sample masking of the steps: refused by name at run time."""
    if lengths is not None and bool((lengths != x.shape[0]).any()):
        raise UnsupportedCase(f"{call.op_type} {call.name!r}: sequences shorter than the input (sequence_lens)")


def _finish(call: Call, ys: list[Tensor], states: list[list[Tensor]]) -> tuple[Tensor, ...]:
    """Y [seq, dirs, batch, H] and the stacked last states [dirs, batch, H]."""
    return (torch.stack(ys, dim=1), *[torch.stack(s, dim=0) for s in states])[: call.n_outputs]


@op("LSTM")
def _lstm(call: Call, x: Tensor, w: Tensor, r: Tensor, b: Tensor | None = None, lengths: Tensor | None = None,
          h0: Tensor | None = None, c0: Tensor | None = None, p: Tensor | None = None) -> tuple[Tensor, ...]:
    _check_lengths(call, x, lengths)
    hidden, batch = r.shape[-1], x.shape[1]
    ys, hs, cs = [], [], []
    for d, backwards in enumerate(_directions(call)):
        h = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
        c = c0[d] if c0 is not None else x.new_zeros(batch, hidden)
        bias = 0 if b is None else b[d, : 4 * hidden] + b[d, 4 * hidden:]
        projected = x @ w[d].T + bias  # every step's input term at once: [seq, batch, 4H]
        steps = range(x.shape[0] - 1, -1, -1) if backwards else range(x.shape[0])
        out = [None] * x.shape[0]
        for t in steps:
            gates = projected[t] + h @ r[d].T
            i, o, f, g = gates.chunk(4, dim=-1)
            if p is not None:  # peepholes: i and f see the previous cell state, o the new one
                p_i, p_o, p_f = p[d].split(hidden)
                i, f = i + p_i * c, f + p_f * c
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if p is not None:
                o = o + p_o * c
            h = torch.sigmoid(o) * torch.tanh(c)
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    return _finish(call, ys, [hs, cs])


@op("GRU")
def _gru(call: Call, x: Tensor, w: Tensor, r: Tensor, b: Tensor | None = None, lengths: Tensor | None = None,
         h0: Tensor | None = None) -> tuple[Tensor, ...]:
    _check_lengths(call, x, lengths)
    hidden, batch = r.shape[-1], x.shape[1]
    before_reset = bool(call.attr("linear_before_reset", 0))
    ys, hs = [], []
    for d, backwards in enumerate(_directions(call)):
        h = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
        wb = x.new_zeros(3 * hidden) if b is None else b[d, : 3 * hidden]
        rb = x.new_zeros(3 * hidden) if b is None else b[d, 3 * hidden:]
        projected = x @ w[d].T + wb  # [seq, batch, 3H]
        rz, rr, rh = r[d].split(hidden)
        bz, br, bh = rb.split(hidden)
        steps = range(x.shape[0] - 1, -1, -1) if backwards else range(x.shape[0])
        out = [None] * x.shape[0]
        for t in steps:
            xz, xr, xh = projected[t].split(hidden, dim=-1)
            z = torch.sigmoid(xz + h @ rz.T + bz)
            reset = torch.sigmoid(xr + h @ rr.T + br)
            if before_reset:
                candidate = torch.tanh(xh + reset * (h @ rh.T + bh))
            else:
                candidate = torch.tanh(xh + (reset * h) @ rh.T + bh)
            h = (1 - z) * candidate + z * h
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
    return _finish(call, ys, [hs])


def _checker(defaults: list[str]):
    def check(attrs: dict[str, Any], facts: dict[str, Any]) -> str | None:
        if attrs.get("clip") is not None:
            return "clip is not supported"
        if attrs.get("input_forget", 0):
            return "input_forget is not supported"
        if attrs.get("layout", 0):
            return "layout 1 is not supported (onnxruntime's CPU kernels refuse it too)"
        given = attrs.get("activations")
        if given is not None and [a.decode() if isinstance(a, bytes) else a for a in given] not in (defaults, defaults * 2):
            return f"activations {list(given)} are not supported (only the default {defaults})"
        return None
    return check


CHECKS["LSTM"] = _checker(["Sigmoid", "Tanh", "Tanh"])
CHECKS["GRU"] = _checker(["Sigmoid", "Tanh"])
