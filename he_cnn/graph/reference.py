"""The plaintext integer reference: the integer model evaluated in the clear, exactly.

This is the function the secure engine must reproduce bit for bit, and the yardstick every secure
protocol test compares with. It walks the same :class:`~he_cnn.graph.IntegerModel` layers with exact
Python integers (object arrays; values outgrow 64 bits), uses the graph's own index helpers for
convolution patches and pooling windows so both sides agree on every element, and checks at each
tensor that the worst-case bound the secure comparisons rely on holds. Helpers at the end score
the integer model on a labelled set and against the float model's predictions.
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import numpy as np

from he_cnn.errors import BoundExceeded, EncodingOverflow, ShapeError, UnsupportedLayer
from he_cnn.graph.integer_model import (
    Concat,
    Conv,
    Dense,
    Flatten,
    IntegerModel,
    Layer,
    MaxPool,
    ReLU,
    conv_output_hw,
    im2col_indices,
    pool_windows,
)


def run_reference(model: IntegerModel, image: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor of ``model`` on ``image`` ``(C, H, W)`` of ints in ``[0, input_max]``, by name.

    Raises :class:`ShapeError` or :class:`EncodingOverflow` for a bad image, and
    :class:`BoundExceeded` if a tensor ever leaves its proven bound (which would be a bug).
    """
    tensors = {model.input_name: _checked_image(model, image)}
    for layer in model.layers:
        value = _evaluate(layer, tensors)
        bound = model.bounds[layer.output]
        peak = np.abs(value).max() if value.size else 0
        if peak > bound:
            raise BoundExceeded(f"{layer.name}: |value| reached {peak}, above the proven bound {bound}")
        tensors[layer.output] = value
    return tensors


def classify_reference(model: IntegerModel, image: np.ndarray) -> np.ndarray:
    """The class-score vector ``(num_classes,)`` of exact ints for one image."""
    return run_reference(model, image)[model.output]


def predict_reference(model: IntegerModel, images: Iterable[np.ndarray]) -> np.ndarray:
    """The integer model's predicted class (argmax, first on ties) for each image."""
    return np.array([int(np.argmax(classify_reference(model, image))) for image in images], dtype=np.int64)


def integer_accuracy(model: IntegerModel, images_int: Iterable[np.ndarray], labels: np.ndarray) -> float:
    """Fraction of images the integer model classifies as ``labels``."""
    return float(np.mean(predict_reference(model, images_int) == np.asarray(labels)))


def float_agreement(model: IntegerModel, images_int: Iterable[np.ndarray], float_predictions: np.ndarray) -> float:
    """Fraction of images where the integer model's class equals the float model's."""
    return float(np.mean(predict_reference(model, images_int) == np.asarray(float_predictions)))


def _checked_image(model: IntegerModel, image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.shape != tuple(model.input_shape):
        raise ShapeError(f"expected an image of shape {tuple(model.input_shape)}, got {array.shape}")
    if array.dtype.kind not in "iuO" or not all(_is_int(v) for v in array.flat):
        raise EncodingOverflow(f"expected integer pixels in [0, {model.input_max}], got dtype {array.dtype}")
    pixels = np.array([int(v) for v in array.flat], dtype=object).reshape(array.shape)
    low, high = min(pixels.flat), max(pixels.flat)
    if low < 0 or high > model.input_max:
        raise EncodingOverflow(f"expected pixels in [0, {model.input_max}], got values from {low} to {high}")
    return pixels


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _evaluate(layer: Layer, tensors: dict[str, np.ndarray]) -> np.ndarray:
    if isinstance(layer, Concat):
        return np.concatenate([tensors[name] for name in layer.inputs], axis=0)
    x = tensors[layer.input]
    if isinstance(layer, Conv):
        return _conv(layer, x)
    if isinstance(layer, Dense):
        return layer.weight.dot(x) + layer.bias
    if isinstance(layer, ReLU):
        return np.maximum(x, 0) // (1 << layer.shift)
    if isinstance(layer, MaxPool):
        return _maxpool(layer, x)
    if isinstance(layer, Flatten):
        return x.reshape(-1)
    raise UnsupportedLayer(f"layer {getattr(layer, 'name', layer)!r} of type {type(layer).__name__} is not supported")


def _conv(layer: Conv, x: np.ndarray) -> np.ndarray:
    c_out, _, kernel, _ = layer.weight.shape
    index = _patch_index(x.shape, kernel, layer.stride, layer.padding)
    padded = np.append(x.ravel(), 0)  # index -1 (zero padding) reads this trailing 0
    out = padded[index].dot(layer.weight.reshape(c_out, -1).T)  # (positions, c_out)
    oh, ow = conv_output_hw(x.shape[1], x.shape[2], kernel, layer.stride, layer.padding)
    return out.T.reshape(c_out, oh, ow) + layer.bias[:, None, None]


def _maxpool(layer: MaxPool, x: np.ndarray) -> np.ndarray:
    x = x // (1 << layer.shift)  # floor, also for negative values
    index = _window_index(x.shape, layer.kernel, layer.stride, layer.padding)
    oh, ow = conv_output_hw(x.shape[1], x.shape[2], layer.kernel, layer.stride, layer.padding)
    return x.ravel()[index].max(axis=1).reshape(x.shape[0], oh, ow)


@lru_cache(maxsize=64)
def _patch_index(shape: tuple[int, int, int], kernel: int, stride: int, padding: int) -> np.ndarray:
    index = im2col_indices(shape, kernel, stride, padding)
    index.setflags(write=False)
    return index


@lru_cache(maxsize=64)
def _window_index(shape: tuple[int, int, int], kernel: int, stride: int, padding: int) -> np.ndarray:
    """Pooling windows as a rectangular index matrix: short (padded) windows repeat their first
    element, which leaves their maximum unchanged."""
    windows = pool_windows(shape, kernel, stride, padding)
    width = kernel * kernel
    index = np.array([w + [w[0]] * (width - len(w)) for w in windows], dtype=np.int64)
    index.setflags(write=False)
    return index
