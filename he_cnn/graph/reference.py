"""The plaintext integer reference: the integer model evaluated in the clear, exactly.

This is the function the secure engine must reproduce bit for bit, and the yardstick every secure
protocol test compares with. It walks the same :class:`~he_cnn.graph.integer_model.IntegerModel`
layers as S1 and evaluates each with its catalogue class's
:meth:`~he_cnn.graph.layers.Layer.evaluate` on exact Python integers (object arrays; values outgrow
64 bits), and checks at each tensor that the worst-case bound the secure comparisons rely on holds. Helpers at the end score
the integer model on a labelled set and against the float model's predictions.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from he_cnn.errors import BadRequest, BoundExceeded, EncodingOverflow, ShapeError
from he_cnn.graph.integer_model import IntegerModel
from he_cnn.graph.layers import check_kind


def run_reference(model: IntegerModel, image: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor of ``model`` on ``image`` ``(C, H, W)`` of ints in ``[0, input_max]``, by name.

    Raises :class:`ShapeError` or :class:`EncodingOverflow` for a bad image, and
    :class:`BoundExceeded` if a tensor ever leaves its proven bound (which would be a bug).
    """
    tensors = {model.input_name: _checked_image(model, image)}
    for layer in model.layers:
        check_kind(layer)
        if not layer.has_private:
            raise BadRequest(f"layer {layer.name!r} has no weights: the reference needs the owner's model")
        value = layer.evaluate([tensors[name] for name in layer.sources()])
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
