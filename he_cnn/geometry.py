"""Index geometry of convolutions and pooling windows, shared by the layers, the reference and the protocols.

Pure functions of shapes: which flat input elements each output position of a convolution reads
(:func:`im2col_indices`, -1 for zero padding), which elements each pooling window holds
(:func:`pool_windows`), and the plan of the separable secure max-pool (:func:`window_ranges`,
:func:`max_runs`, :func:`maxpool_comparisons`). Both the plaintext reference and the secure protocols
index through these, so they agree on every element.
"""
from __future__ import annotations

import numpy as np

#: a window dimension: one int for both axes, or (along H, along W)
Size = int | tuple[int, int]


def pair(value: Size) -> tuple[int, int]:
    """``(h, w)`` of a window dimension given as one int (square) or a pair."""
    if isinstance(value, (tuple, list)):
        h, w = value
        return int(h), int(w)
    return int(value), int(value)


def conv_output_hw(h: int, w: int, kernel: Size, stride: Size, padding: Size) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(padding)
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


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


def maxpool_comparisons(shape: tuple[int, ...], kernel: Size, stride: Size, padding: Size) -> int:
    """Pairwise maxima the separable secure max-pool computes for a (C, H, W) tensor."""
    c, h, w = shape
    oh, ow = conv_output_hw(h, w, kernel, stride, padding)
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(padding)

    def per_line(length: int, count: int, k: int, s: int, p: int) -> int:
        window_runs, levels = max_runs(window_ranges(length, count, k, s, p))
        return sum(len(v) for v in levels.values()) + sum(len(rs) - 1 for rs in window_runs)

    return c * h * per_line(w, ow, kw, sw, pw) + c * ow * per_line(h, oh, kh, sh, ph)


def pool_windows(shape: tuple[int, int, int], kernel: Size, stride: Size, padding: Size) -> list[list[int]]:
    """Flat indices (into a C-order (C,H,W) tensor) of every pooling window, padding left out.

    Windows are listed in output order (c, i, j). Built from :func:`window_ranges`, the ranges the
    secure SMAP uses, so the reference and SMAP agree on which elements each window holds.
    """
    c, h, w = shape
    oh, ow = conv_output_hw(h, w, kernel, stride, padding)
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(padding)
    rows, cols = window_ranges(h, oh, kh, sh, ph), window_ranges(w, ow, kw, sw, pw)
    return [[(ch * h + y) * w + x for y in range(r0, r1 + 1) for x in range(c0, c1 + 1)]
            for ch in range(c) for r0, r1 in rows for c0, c1 in cols]


def im2col_indices(shape: tuple[int, int, int], kernel: Size, stride: Size, padding: Size) -> np.ndarray:
    """Index matrix (P, F) into a flat (C,H,W) tensor for a convolution, -1 where zero padding is.

    Row p is output position (i, j); column f runs over (channel, u, v) in the order of a torch
    kernel ``weight[c_out].ravel()``, so ``cols @ weight.reshape(C_out, -1).T`` is the convolution.
    A sum-pool reads the same windows one channel at a time (:func:`window_indices`).
    """
    c, h, w = shape
    oh, ow = conv_output_hw(h, w, kernel, stride, padding)
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(padding)
    y = (np.arange(oh) * sh - ph)[:, None, None, None, None] + np.arange(kh)[None, None, None, :, None]
    x = (np.arange(ow) * sw - pw)[None, :, None, None, None] + np.arange(kw)[None, None, None, None, :]
    ch = np.arange(c)[None, None, :, None, None]
    inside = (0 <= y) & (y < h) & (0 <= x) & (x < w)
    idx = np.where(inside, (ch * h + y) * w + x, -1)
    return np.ascontiguousarray(np.broadcast_to(idx, (oh, ow, c, kh, kw)).reshape(oh * ow, c * kh * kw), dtype=np.int64)


def window_indices(shape: tuple[int, int, int], kernel: Size, stride: Size, padding: Size) -> np.ndarray:
    """(C * P, kh * kw) flat indices of every window of every channel, in output order (c, i, j);
    -1 where zero padding is (a sum-pool's windows)."""
    c, h, w = shape
    single = im2col_indices((1, h, w), kernel, stride, padding)  # (P, kh kw) for channel 0
    offsets = (np.arange(c) * h * w)[:, None, None]
    return np.where(single[None] < 0, -1, single[None] + offsets).reshape(-1, single.shape[1])


def pad_indices(shape: tuple[int, int, int], pads: tuple[int, int, int, int]) -> np.ndarray:
    """Flat indices of a zero-padded (C, H, W) tensor into the unpadded one, -1 for the padding;
    ``pads`` is (top, left, bottom, right)."""
    c, h, w = shape
    top, left, bottom, right = pads
    index = np.full((c, h + top + bottom, w + left + right), -1, dtype=np.int64)
    index[:, top:top + h, left:left + w] = np.arange(c * h * w).reshape(c, h, w)
    return index
