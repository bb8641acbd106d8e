"""im2col: a 2-D convolution's input as the rows of a matrix product.

A Conv with weight W [O, C, kh, kw] (one group) computes, at every output pixel, ``W.reshape(O, -1)
@ patch`` where ``patch`` is the [C, kh, kw] window of the (padded) input under the kernel. So the
layer-wise pruning problem of a Conv is that of a linear layer with ``C·kh·kw`` inputs whose rows
are the patches (SparseGPT, Frantar & Alistarh 2023, treats convolutions this way): its Hessian is
``Σ patchᵀ patch``. ``Patches.rows`` builds those rows in ONNX's (C, kh, kw) order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class Patches:
    """The geometry of one 2-D Conv (ONNX attributes; ``auto_pad`` as written)."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)
    auto_pad: str = "NOTSET"

    def rows(self, x: np.ndarray) -> np.ndarray:
        """[N, C, H, W] -> [N·H_out·W_out, C·kh·kw] float32, one row per output pixel."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"a 2-D convolution input has rank 4, not {x.ndim}")
        top, left, bottom, right = self._pads(x.shape[2:])
        if top or left or bottom or right:
            x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        windows = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
        windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, H_out, W_out, kh, kw]
        n, c, h_out, w_out = windows.shape[:4]
        return np.ascontiguousarray(windows.transpose(0, 2, 3, 1, 4, 5)).reshape(n * h_out * w_out, c * kh * kw)

    def _pads(self, spatial: tuple[int, ...]) -> tuple[int, int, int, int]:
        if self.auto_pad in ("NOTSET", ""):
            return self.pads
        if self.auto_pad == "VALID":
            return (0, 0, 0, 0)
        before, after = same_pads(spatial, self.kernel, self.strides, self.dilations, self.auto_pad == "SAME_UPPER")
        return (before[0], before[1], after[0], after[1])


def same_pads(spatial, kernel, strides, dilations, upper: bool) -> tuple[list[int], list[int]]:
    """ONNX ``auto_pad`` SAME_UPPER / SAME_LOWER: (begins, ends) per spatial axis so that the output
    is ceil(size / stride); UPPER puts the odd pixel at the end."""
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins, ends
