"""The patent's Inception CNN (ICNN) in torch, wired from one explicit table.

The network has exactly eleven convolutions (five 1x1, three 3x3, two 5x5, one 7x7) and four max
pools (one 2x2, three 3x3): a 7x7 stem, two Inception blocks of four branches each, and one dense
layer over the flattened 4x4x32 map. Every step, the channel concatenations included, is a module
attribute named in :data:`WIRING`, which lists the steps in execution order with the tensors they
read. :meth:`ICNN.forward` walks that table, and so do quantisation (:mod:`he_cnn.training.quantize`, which
keeps the names as the integer layers' names) and :meth:`ICNN.summary`, so the three cannot drift
apart. Max pools come before the ReLUs that follow them: the two commute, and pooling first leaves
fewer values for the costly secure comparisons.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

INPUT = "input"

#: (step name, names of the tensors it reads), in execution order; a step's output is its name
WIRING: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("stem_conv", (INPUT,)),
    ("stem_pool", ("stem_conv",)),
    ("stem_relu", ("stem_pool",)),
    # Inception A on 8x8x4
    ("a_b1", ("stem_relu",)),
    ("a_b2_reduce", ("stem_relu",)),
    ("a_b2_relu", ("a_b2_reduce",)),
    ("a_b2", ("a_b2_relu",)),
    ("a_b3_reduce", ("stem_relu",)),
    ("a_b3_relu", ("a_b3_reduce",)),
    ("a_b3", ("a_b3_relu",)),
    ("a_b4_pool", ("stem_relu",)),
    ("a_b4", ("a_b4_pool",)),
    ("a_concat", ("a_b1", "a_b2", "a_b3", "a_b4")),
    ("mid_pool", ("a_concat",)),
    ("mid_relu", ("mid_pool",)),
    # Inception B on 4x4x16
    ("b_b1", ("mid_relu",)),
    ("b_b2", ("mid_relu",)),
    ("b_b3", ("mid_relu",)),
    ("b_b4_pool", ("mid_relu",)),
    ("b_b4", ("b_b4_pool",)),
    ("b_concat", ("b_b1", "b_b2", "b_b3", "b_b4")),
    ("b_relu", ("b_concat",)),
    ("flatten", ("b_relu",)),
    ("fc", ("flatten",)),
)


class ChannelConcat(nn.Module):
    """Concatenate ``(N, C_i, H, W)`` tensors along the channel axis."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.cat(tensors, dim=1)


@dataclass(frozen=True)
class LayerSummary:
    """One row of the layer table: what a step costs in plaintext and in secure comparisons."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    macs: int  # multiply-accumulates (conv and dense only)
    relus: int  # values passed through a ReLU (one secure comparison each)
    pool_windows: int  # max-pool output values (each a max over its window)


class ICNN(nn.Module):
    """Inception CNN for ``(N, 1, size, size)`` images in [0, 1] and ``num_classes`` outputs.

    ``image_size`` must be a multiple of 4 (two stride-2 poolings).
    """

    def __init__(self, num_classes: int = 10, image_size: int = 16) -> None:
        super().__init__()
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image size must be a positive multiple of 4, got {image_size}")
        self.image_size = image_size
        self.input_shape = (1, image_size, image_size)
        self.stem_conv = nn.Conv2d(1, 4, 7, padding=3)
        self.stem_pool = nn.MaxPool2d(2, stride=2)
        self.stem_relu = nn.ReLU()

        self.a_b1 = nn.Conv2d(4, 4, 1)
        self.a_b2_reduce = nn.Conv2d(4, 4, 1)
        self.a_b2_relu = nn.ReLU()
        self.a_b2 = nn.Conv2d(4, 4, 3, padding=1)
        self.a_b3_reduce = nn.Conv2d(4, 2, 1)
        self.a_b3_relu = nn.ReLU()
        self.a_b3 = nn.Conv2d(2, 4, 5, padding=2)
        self.a_b4_pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.a_b4 = nn.Conv2d(4, 4, 1)
        self.a_concat = ChannelConcat()

        self.mid_pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.mid_relu = nn.ReLU()

        self.b_b1 = nn.Conv2d(16, 8, 1)
        self.b_b2 = nn.Conv2d(16, 8, 3, padding=1)
        self.b_b3 = nn.Conv2d(16, 8, 5, padding=2)
        self.b_b4_pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.b_b4 = nn.Conv2d(16, 8, 3, padding=1)
        self.b_concat = ChannelConcat()
        self.b_relu = nn.ReLU()

        self.flatten = nn.Flatten()
        self.fc = nn.Linear((image_size // 4) ** 2 * 32, num_classes)

    def steps(self) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
        """``(name, module, input names)`` for every step, in execution order."""
        return [(name, getattr(self, name), inputs) for name, inputs in WIRING]

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every intermediate tensor by step name (``"input"`` included)."""
        tensors = {INPUT: x}
        for name, module, inputs in self.steps():
            tensors[name] = module(*(tensors[i] for i in inputs))
        return tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[WIRING[-1][0]]

    def summary(self) -> list[LayerSummary]:
        """The layer table: kind, output shape, MACs, ReLU count and pool windows of every step."""
        with torch.no_grad():
            tensors = self.forward_all(torch.zeros(1, *self.input_shape))
        rows = []
        for name, module, _ in self.steps():
            shape = tuple(tensors[name].shape[1:])
            outputs = tensors[name].numel()
            macs = relus = windows = 0
            if isinstance(module, nn.Conv2d):
                kind = f"conv {module.kernel_size[0]}x{module.kernel_size[1]}"
                macs = outputs * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            elif isinstance(module, nn.Linear):
                kind, macs = "dense", outputs * module.in_features
            elif isinstance(module, nn.MaxPool2d):
                kind, windows = f"maxpool {module.kernel_size}x{module.kernel_size}/{module.stride}", outputs
            elif isinstance(module, nn.ReLU):
                kind, relus = "relu", outputs
            else:
                kind = "concat" if isinstance(module, ChannelConcat) else "flatten"
            rows.append(LayerSummary(name, kind, shape, macs, relus, windows))
        return rows


def format_summary(rows: list[LayerSummary]) -> str:
    """The layer table as Markdown, with a totals row."""
    lines = [
        "| layer | kind | output (C, H, W) | MACs | ReLUs | pool windows |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        shape = "x".join(str(d) for d in r.output_shape)
        lines.append(f"| {r.name} | {r.kind} | {shape} | {r.macs} | {r.relus} | {r.pool_windows} |")
    total = (sum(r.macs for r in rows), sum(r.relus for r in rows), sum(r.pool_windows for r in rows))
    lines.append(f"| **total** | | | {total[0]} | {total[1]} | {total[2]} |")
    return "\n".join(lines)
