"""Index geometry of convolutions and pooling windows, shared by the layers, the reference and the protocols.

Pure functions of shapes: which flat input elements each output position of a convolution reads
(:func:`im2col_indices`, -1 for zero padding), which elements each pooling window holds
(:func:`pool_windows`), and the plan of the separable secure max-pool (:func:`window_ranges`,
:func:`max_runs`, :func:`maxpool_comparisons`). Both the plaintext reference and the secure protocols
index through these, so they agree on every element.
"""
from __future__ import annotations

import numpy as np


def conv_output_hw(h: int, w: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1


def window_ranges(length: int, count: int, kernel: int, stride: int, padding: int) -> list[tuple[int, int]]:
    """Inclusive [start, end] of each pooling window along one axis, padding clipped away."""
    return [(max(0, j * stride - padding), min(length - 1, j * stride - padding + kernel - 1)) for j in range(count)]


def max_runs(ranges: list[tuple[int, int]]) -> tuple[list[list[tuple[int, int]]], dict[int, list[int]]]:
    """How a line's window maxima are built from shared runs (the separable max-pool's plan).

    Each range is split into aligned-left runs (t, start) of 2^t neighbours, largest first. Returns the
    runs of every window and, per level t >= 1, the sorted starts of the runs whose maxima must be
    built (from two runs of level t - 1), shared by all windows that use them.
    """
    def runs(a: int, b: int) -> list[tuple[int, int]]:
        out = []
        while a <= b:
            t = (b - a + 1).bit_length() - 1
            out.append((t, a))
            a += 1 << t
        return out

    window_runs = [runs(a, b) for a, b in ranges]
    needed: set[tuple[int, int]] = set()
    stack = [r for rs in window_runs for r in rs]
    while stack:
        t, i = stack.pop()
        if t and (t, i) not in needed:
            needed.add((t, i))
            stack += [(t - 1, i), (t - 1, i + (1 << (t - 1)))]
    levels = {level: sorted(i for t, i in needed if t == level) for level in {t for t, _ in needed}}
    return window_runs, levels


def maxpool_comparisons(shape: tuple[int, ...], kernel: int, stride: int, padding: int) -> int:
    """Pairwise maxima the separable secure max-pool computes for a (C, H, W) tensor."""
    c, h, w = shape
    oh, ow = conv_output_hw(h, w, kernel, stride, padding)

    def per_line(length: int, count: int) -> int:
        window_runs, levels = max_runs(window_ranges(length, count, kernel, stride, padding))
        return sum(len(v) for v in levels.values()) + sum(len(rs) - 1 for rs in window_runs)

    return c * h * per_line(w, ow) + c * ow * per_line(h, oh)


def pool_windows(shape: tuple[int, int, int], kernel: int, stride: int, padding: int) -> list[list[int]]:
    """Flat indices (into a C-order (C,H,W) tensor) of every pooling window, padding left out.

    Windows are listed in output order (c, i, j). Built from :func:`window_ranges`, the ranges the
    secure SMAP uses, so the reference and SMAP agree on which elements each window holds.
    """
    c, h, w = shape
    oh, ow = conv_output_hw(h, w, kernel, stride, padding)
    rows, cols = window_ranges(h, oh, kernel, stride, padding), window_ranges(w, ow, kernel, stride, padding)
    return [[(ch * h + y) * w + x for y in range(r0, r1 + 1) for x in range(c0, c1 + 1)]
            for ch in range(c) for r0, r1 in rows for c0, c1 in cols]


def im2col_indices(shape: tuple[int, int, int], kernel: int, stride: int, padding: int) -> np.ndarray:
    """Index matrix (P, F) into a flat (C,H,W) tensor for a convolution, -1 where zero padding is.

    Row p is output position (i, j); column f runs over (channel, u, v) in the order of a torch
    kernel ``weight[c_out].ravel()``, so ``cols @ weight.reshape(C_out, -1).T`` is the convolution.
    """
    c, h, w = shape
    oh, ow = conv_output_hw(h, w, kernel, stride, padding)
    idx = np.full((oh * ow, c * kernel * kernel), -1, dtype=np.int64)
    for i in range(oh):
        for j in range(ow):
            p = i * ow + j
            f = 0
            for ch in range(c):
                for u in range(kernel):
                    for v in range(kernel):
                        y, x = i * stride - padding + u, j * stride - padding + v
                        if 0 <= y < h and 0 <= x < w:
                            idx[p, f] = (ch * h + y) * w + x
                        f += 1
    return idx
