"""Bring your own CNN: compile a torch module or an ONNX file into he-cnn's exact integer model.

:func:`compile_model` (also ``he_cnn.compile``) takes the user's network and a few sample images and
returns a :class:`CompiledModel`: the :class:`~he_cnn.graph.integer_model.IntegerModel` the secure
engine runs, plus the float graph it approximates. The path is the same for both front ends:

1. a torch ``nn.Module`` is exported to ONNX in memory (``torch.onnx.export(..., dynamo=True)``); an
   ONNX file (path, bytes or ``ModelProto``) is read as it is. There is one importer, for ONNX: it is
   the ecosystem's exchange format (Keras, scikit-learn's and other exporters write it too), it is the
   path CrypTen and Concrete ML take, and it means both front ends give the same graph by construction;
2. :mod:`~he_cnn.compiler.onnx_import` turns the file into a float graph
   (:mod:`~he_cnn.compiler.float_graph`): constants folded, BatchNormalization folded into the layer
   before it, ReLU moved after the max-pool that follows it, a final Softmax dropped;
3. the input normalisation ``(p - mean) / std`` of the :class:`~he_cnn.images.Preprocessing` is folded
   into the first Conv / Gemm layers, so the integer model reads the pixels ``round(p * input_max)``
   as the user sends them. With zero padding in such a convolution this is exact only where
   mean = 0 (the float model padded the normalised input, the folded one pads the pixels): a notice
   says so, and :meth:`CompiledModel.agreement` measures against the user's unfolded model;
4. :mod:`~he_cnn.compiler.lower` quantises, calibrated on the sample images, and
   :func:`~he_cnn.graph.integer_model.build_model` proves every tensor's worst-case bound.

Notices (what the compiler changed that the user should know) are returned, recorded in the model's
``meta`` and, as they are final, passed to the ``notice`` callback (a CLI prints them on stderr).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from he_cnn.compiler.float_graph import FloatGraph, fold_normalisation
from he_cnn.compiler.lower import lower
from he_cnn.compiler.onnx_import import ModelSource, import_onnx, read_onnx
from he_cnn.errors import BadRequest, UnsupportedLayer
from he_cnn.graph.integer_model import IntegerModel, build_model
from he_cnn.graph.reference import predict_reference
from he_cnn.images import Preprocessing

__all__ = ["CompiledModel", "compile_model"]

#: loggers the torch exporter writes progress and optional-dependency warnings to
EXPORT_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "onnxscript", "onnx_ir")


@dataclass(frozen=True)
class CompiledModel:
    """The result of :func:`compile_model`.

    ``model`` is the integer model; ``float_graph`` the float model it quantises (normalisation
    folded in: it reads pixels in [0, 1], ``(n, C, H, W)``, and returns float scores);
    ``source_graph`` the user's float model as imported (it reads normalised inputs).
    """

    model: IntegerModel
    float_graph: FloatGraph
    source_graph: FloatGraph
    preprocessing: Preprocessing
    notices: tuple[str, ...]

    def integer_inputs(self, images: np.ndarray) -> np.ndarray:
        """Pixel images ``(n, C, H, W)`` in [0, 1] as the integers ``round(p * input_max)`` (dtype object)."""
        return np.stack([self.preprocessing.quantize(image) for image in _pixels(images, self.model.input_shape)])

    def source_scores(self, images: np.ndarray) -> np.ndarray:
        """The user's own float model on pixel images: ``source_graph((p - mean) / std)``."""
        pixels = _pixels(images, self.model.input_shape)
        mean, std = (np.asarray(v)[None, :, None, None] for v in (self.preprocessing.mean, self.preprocessing.std))
        return self.source_graph((pixels - mean) / std)

    def predictions(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The class of each pixel image by the integer model (exact integer reference) and by the user's
        float model (argmax, first on ties)."""
        return (predict_reference(self.model, self.integer_inputs(images)),
                np.argmax(self.source_scores(images), axis=1))

    def agreement(self, images: np.ndarray) -> float:
        """The fraction of pixel images on which the two :meth:`predictions` agree."""
        integer, floating = self.predictions(images)
        return float(np.mean(integer == floating))


def compile_model(model: ModelSource | Any, calibration: np.ndarray, *, preprocessing: Preprocessing | None = None,
                  weight_bits: int = 10, activation_bits: int = 12, classes: Sequence[str] | None = None,
                  notice: Callable[[str], None] | None = None) -> CompiledModel:
    """Compile ``model`` (a torch ``nn.Module``, or an ONNX file: path, bytes or ``onnx.ModelProto``).

    ``calibration``: sample images ``(n, C, H, W)``, pixels in [0, 1] as the user has them (resized,
    channels converted, not normalised); they choose the requantising shifts. ``preprocessing``
    defaults to the model's input shape, grey for 1 channel and RGB for 3, ``input_max`` 255, no
    normalisation. ``weight_bits`` bounds every weight (|w| < 2**(weight_bits-1)); ``activation_bits``
    the calibrated peak after each ReLU. Raises :class:`UnsupportedLayer` for a network he-cnn cannot
    compile and :class:`BadRequest` for malformed input; both name what was expected.
    """
    if type(weight_bits) is not int or not 2 <= weight_bits <= 32:
        raise BadRequest(f"weight_bits must be an int in [2, 32], got {weight_bits!r}")
    if type(activation_bits) is not int or not 2 <= activation_bits <= 64:
        raise BadRequest(f"activation_bits must be an int in [2, 64], got {activation_bits!r}")
    images = np.asarray(calibration, dtype=np.float64)
    if images.ndim != 4:
        raise BadRequest(f"calibration must be images (n, C, H, W), got shape {images.shape}")
    images = _pixels(images, preprocessing.input_shape if preprocessing else images.shape[1:])
    source = "onnx" if isinstance(model, ModelSource) else "torch"
    proto = read_onnx(model if source == "onnx" else _export_torch(model, images[:1]))
    graph, notices = import_onnx(proto)
    preprocessing = preprocessing or Preprocessing.default_for(graph.input_shape, 255)
    if preprocessing.input_shape != graph.input_shape:
        raise BadRequest(f"preprocessing gives inputs of shape {preprocessing.input_shape}; the model takes "
                         f"{graph.input_shape}")
    pixels = _pixels(images, graph.input_shape)
    folded, folding_notices = fold_normalisation(graph, np.asarray(preprocessing.mean), np.asarray(preprocessing.std))
    notices += folding_notices
    layers, scales = lower(folded, pixels, preprocessing.input_max, weight_bits, activation_bits)
    num_classes = folded.shapes[folded.output][0]
    names = [str(i) for i in range(num_classes)] if classes is None else [str(c) for c in classes]
    if len(names) != num_classes:
        raise BadRequest(f"{len(names)} class names for a model with {num_classes} outputs")
    meta = {"classes": names, "preprocessing": preprocessing.to_json(), "source": source,
            "weight_bits": weight_bits, "activation_bits": activation_bits,
            "scales": {tensor: str(scale) for tensor, scale in scales.items()}, "notices": list(notices)}
    integer = build_model(layers, folded.input_name, folded.input_shape, preprocessing.input_max, folded.output, meta)
    if notice is not None:
        for line in notices:
            notice(line)
    return CompiledModel(integer, folded, graph, preprocessing, tuple(notices))


def _pixels(images: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``images`` checked: float (n, C, H, W) of the model's input shape, finite, in [0, 1]."""
    array = np.asarray(images, dtype=np.float64)
    if array.ndim != 4 or array.shape[1:] != tuple(shape) or len(array) < 1:
        raise BadRequest(f"expected images of shape (n, {', '.join(map(str, shape))}), got {array.shape}")
    if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
        raise BadRequest("image pixels must be finite and within [0, 1] (before any normalisation)")
    return array


def _export_torch(module: Any, example: np.ndarray) -> bytes:
    """The module as ONNX bytes, exported in eval mode on one example image (its mode is restored)."""
    import torch  # only the torch front end needs it

    if not isinstance(module, torch.nn.Module):
        raise BadRequest(f"expected a torch nn.Module, an ONNX file path, its bytes or an onnx.ModelProto; "
                         f"got {type(module).__name__}")
    training = module.training
    buffer = io.BytesIO()
    try:
        with _quiet_exporter():
            torch.onnx.export(module.eval(), (torch.as_tensor(example, dtype=torch.float32),), buffer,
                              dynamo=True, verbose=False, optimize=True)
    except Exception as e:  # torch.export reports unsupported Python constructs with many error types
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        raise UnsupportedLayer(f"torch.onnx.export could not export the module on an input of shape "
                               f"{tuple(example.shape)}: {type(cause).__name__}: {first}") from e
    finally:
        module.train(training)
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's warnings and log lines silenced for the export, the loggers' levels restored."""
    loggers = [logging.getLogger(name) for name in EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
