"""The model zoo: the float networks an owner can train, sized for secure inference.

Four architectures, by name in :data:`ZOO`: the patent's ICNN (:mod:`he_cnn.training.icnn`), a small
VGG (stacked 3x3 convolutions with padding 1, 2x2 max pools, a dense head), a small ResNet (batch
norm and one basic block with an identity skip, then global average pooling), all three classifiers,
and ``embed``, the same VGG with 32 outputs trained as an embedding network for 1:N identification
(:mod:`he_cnn.training.embedding`: its output is a feature vector, not class scores). They are plain torch
modules written as torch users write them (ReLU then max pool, batch norm after convolutions): the
compiler folds batch norm into the convolutions and moves each max pool in front of the ReLU before
it, which gives the same result on a quarter of the values.

Secure inference pays per comparison (one per ReLU value, ``k*k - 1`` per max-pool window) and per
multiply-accumulate (MAC) of an encrypted value by a weight. On a 28x28 grey input (MNIST), with each
max pool moved in front of its ReLU (``tests/test_zoo.py`` recounts this table through forward hooks):

======  ======  ============  ===========  =======  ==========
model   ReLUs   pool windows  comparisons  MACs     parameters
======  ======  ============  ===========  =======  ==========
icnn     4,312         3,136       25,480  523,712      21,976
vgg      2,776         1,176        6,304  210,432      13,826
resnet   3,528         1,960        9,408  282,320       1,362
embed    2,776         1,176        6,304  211,136      14,552
======  ======  ============  ===========  =======  ==========

(the ICNN's 3x3 pools cost 8 comparisons a window; on 16x16 digits the four need 8,320, 2,080, 3,072
and 2,080 comparisons). The VGG keeps VGG16's pattern (3x3 convolutions, a pool per stage, channels
doubling from stage to stage) at a sixteenth of its width: [conv 4] pool [conv 8, conv 8] pool, dense
32, dense to the classes (``embed``: to its 32 features, as the table counts it). The ResNet is
ResNet's stem and basic block at 8 channels: conv, batch norm, ReLU, pool, the block, pool, global
average pool, dense. Each :class:`Architecture` also carries the epochs and peak learning rate it
trains well with (:func:`~he_cnn.training.train.train_architecture`): with them, seed 0, on one
thread, the float test accuracy is 98.2% for the VGG (1.6 s) and 97.6% for the ResNet (3.3 s) on the
16x16 digits, 97.5% (7.4 s) and 96.2% (15.7 s) on the 28x28 MNIST sample; the embedding network
trains 40 epochs (about 5 s; its rank-1 accuracy on the digits was 94.4-97.8% after 15 over seeds
0-3, 98.7-98.9% after 40). DP-SGD (``--dp-epsilon``) trains the ICNN and the VGG with their
``dp_epochs`` and ``dp_lr``; it cannot train the ResNet, whose batch norm mixes the examples of a
batch (:mod:`he_cnn.training.dp`), nor the embedding network.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from he_cnn.errors import BadRequest
from he_cnn.training.icnn import ICNN

Shape = tuple[int, int, int]


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm, the input added back before the last ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # no biases: the batch norm after each convolution has its own shift
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


def _icnn(input_shape: Shape, num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    if channels != 1 or height != width or height % 4:
        raise BadRequest(f"the ICNN takes square grey inputs with a side that is a multiple of 4, "
                         f"got {list(input_shape)}")
    return ICNN(num_classes=num_classes, image_size=height)


def _vgg(input_shape: Shape, num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(channels, 4, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(4, 8, 3, padding=1)), ("relu2", nn.ReLU()),
        ("conv3", nn.Conv2d(8, 8, 3, padding=1)), ("relu3", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(8 * (height // 4) * (width // 4), 32)), ("relu4", nn.ReLU()),
        ("fc2", nn.Linear(32, num_classes)),
    ]))


def _resnet(input_shape: Shape, num_classes: int) -> nn.Module:
    channels = input_shape[0]
    return nn.Sequential(OrderedDict([
        ("stem_conv", nn.Conv2d(channels, 8, 3, padding=1, bias=False)), ("stem_bn", nn.BatchNorm2d(8)),
        ("stem_relu", nn.ReLU()), ("stem_pool", nn.MaxPool2d(2)),
        ("block", BasicBlock(8)),
        ("pool", nn.MaxPool2d(2)),
        ("global_pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(8, num_classes)),
    ]))


@dataclass(frozen=True)
class Architecture:
    """One zoo entry: how to build it for an input ``(C, H, W)`` and a number of outputs, and how to train it."""

    name: str
    build: Callable[[Shape, int], nn.Module]
    epochs: int
    lr: float  # peak of the one-cycle schedule
    #: DP-SGD's (:mod:`he_cnn.training.dp`): noisy, clipped steps learn slower and want a higher rate
    dp_epochs: int = 30
    dp_lr: float = 3e-2
    #: an embedding network's output size (trained by :func:`~he_cnn.training.train.train_embedding`);
    #: None for a classifier, whose outputs are the data set's classes
    features: int | None = None

    def outputs(self, num_classes: int) -> int:
        """The size of the network's output for a data set of ``num_classes`` classes."""
        return num_classes if self.features is None else self.features


#: every architecture, by name
ZOO: dict[str, Architecture] = {a.name: a for a in (
    Architecture("icnn", _icnn, epochs=15, lr=1e-2),
    Architecture("vgg", _vgg, epochs=15, lr=2e-2),
    Architecture("resnet", _resnet, epochs=25, lr=3e-2),
    Architecture("embed", _vgg, epochs=40, lr=2e-2, features=32),
)}
ARCHITECTURES = tuple(ZOO)
#: every zoo network halves the input twice
MIN_SIDE = 4


def architecture(name: str) -> Architecture:
    if name not in ZOO:
        raise BadRequest(f"unknown architecture {name[:40]!r}; expected one of {', '.join(ARCHITECTURES)}")
    return ZOO[name]


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A new float model of architecture ``arch`` for ``(C, H, W)`` inputs in [0, 1] and ``num_classes`` outputs
    (an embedding network's features: :meth:`Architecture.outputs`).

    Building leaves the caller's random state as it was; the weights it draws are placeholders that
    :func:`~he_cnn.training.train.train_classifier` replaces with weights drawn from its seed.
    """
    entry = architecture(arch)
    if len(input_shape) != 3 or not all(type(v) is int and v >= 1 for v in input_shape):
        raise BadRequest(f"input shape must be 3 positive ints (C, H, W), got {list(input_shape)}")
    if min(input_shape[1:]) < MIN_SIDE:
        raise BadRequest(f"input {list(input_shape)} is smaller than {MIN_SIDE}x{MIN_SIDE}")
    if type(num_classes) is not int or num_classes < 2:
        raise BadRequest(f"a classifier needs at least 2 classes, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        return entry.build(tuple(input_shape), num_classes)  # type: ignore[arg-type]
