"""``he-cnn owner compile``: a user's own ONNX model, compiled for the clouds, scored and priced.

The owner gives the ONNX file and sample images (a folder, with one sub-folder per class when labels
are known, or a ``.npy`` batch with ``--labels``). Half of them (at most :data:`MAX_CALIBRATION`)
calibrate the requantising shifts; the rest are held out to score the float model, the integer model
and their argmax agreement. The report also holds the layer table (kind, shape, bits, compared bits,
multiply-accumulates) and the cost model's predicted seconds per query for a key size on this machine
(:func:`he_cnn.compiler.cost.predict_for_machine`). Nothing here prints: the CLI does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from he_cnn.compiler import compile_model, cost
from he_cnn.compiler.onnx_import import import_onnx, read_onnx
from he_cnn.errors import BadRequest
from he_cnn.graph.integer_model import IntegerModel, save_integer_model
from he_cnn.images import IMAGE_SUFFIXES, Preprocessing, read_npy
from he_cnn.parties.compute_cloud import check_fits

#: images that calibrate at most; the rest are held out
MAX_CALIBRATION = 512
#: sample images read at most (a folder's, a .npy batch's)
MAX_IMAGES = 4096
#: a calibration .npy file's largest size
MAX_NPY_BYTES = 256 << 20


def compile_file(model_file: str, calibrate: str, out: str, *, labels: str | None = None, weight_bits: int = 10,
                 activation_bits: int = 12, input_max: int = 255, channels: str | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 classes: Sequence[str] | None = None, key_bits: int = 2048, seed: int = 0,
                 notice=None) -> dict[str, Any]:
    """Compile ``model_file`` and write the integer model to ``out``; the report (see the module doc)."""
    graph, _ = import_onnx(read_onnx(model_file))
    c, h, w = graph.input_shape
    default = Preprocessing.default_for(graph.input_shape, input_max) if c in (1, 3) else None
    if default is None and channels is None:
        raise BadRequest(f"the model takes {c} input channels; say which with --channels")
    preprocessing = Preprocessing(h, w, channels or default.channels, input_max,
                                  tuple(mean) if mean else (0.0,) * c, tuple(std) if std else (1.0,) * c)
    images, truth, names = load_calibration(calibrate, preprocessing, labels)
    order = np.random.default_rng(seed).permutation(len(images))
    split = min(MAX_CALIBRATION, len(images) // 2) if len(images) >= 20 else len(images)
    held_out = order[split:] if split < len(images) else order
    compiled = compile_model(model_file, images[order[:split]], preprocessing=preprocessing, weight_bits=weight_bits,
                             activation_bits=activation_bits, classes=classes or names, notice=notice)
    check_fits(compiled.model, key_bits)
    save_integer_model(compiled.model, out)
    evaluation = images[held_out]
    integer, floating = compiled.predictions(evaluation)  # the reference once, for all three figures
    report: dict[str, Any] = {"out": out, "notices": list(compiled.notices), "calibration_images": int(split),
                              "held_out_images": int(len(held_out)),
                              "agreement": float(np.mean(integer == floating))}
    if truth is not None:
        y = truth[held_out]
        report["float_accuracy"] = float(np.mean(floating == y))
        report["integer_accuracy"] = float(np.mean(integer == y))
    prediction = cost.predict_for_machine(compiled.model.to_spec(), key_bits)
    report["layers"] = layer_table(compiled.model, prediction)
    report["predicted"] = {k: v for k, v in prediction.items() if k != "layers"}
    return report


def layer_table(model: IntegerModel, prediction: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per layer: kind, output shape, bits, and for interactive layers the predicted work."""
    predicted = {row["name"]: row for row in prediction["layers"]}
    rows = []
    for layer in model.layers:
        row = {"name": layer.name, "kind": layer.kind, "shape": list(model.shapes[layer.output]),
               "bits": model.bits[layer.output]}
        if layer.name in predicted:
            p = predicted[layer.name]
            row.update({k: p[k] for k in ("compared_bits", "macs", "rounds", "bytes")},
                       seconds=round(p["predicted_seconds"], 3))
        rows.append(row)
    return rows


def load_calibration(path: str, preprocessing: Preprocessing, labels: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Sample images ``(n, C, H, W)`` in [0, 1], their labels (or None) and the class names a folder
    of class sub-folders gives (or None)."""
    source = Path(path)
    if source.is_dir():
        if labels:
            raise BadRequest("--labels goes with a .npy calibration; a folder's labels are its sub-folders")
        return _folder(source, preprocessing)
    images = _npy(source, "calibration")
    if images.ndim not in (3, 4) or len(images) > MAX_IMAGES:
        raise BadRequest(f"calibration {str(source)!r}: expected at most {MAX_IMAGES} images (n, C, H, W), (n, H, W) "
                         f"or (n, H, W, C); got shape {images.shape}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim == 4 and images.shape[1:] != preprocessing.input_shape and images.shape[-1] == preprocessing.channel_count:
        images = images.transpose(0, 3, 1, 2)  # (n, H, W, C) as pictures are stored
    if images.ndim != 4 or images.shape[1:] != preprocessing.input_shape or len(images) < 1:
        raise BadRequest(f"calibration {str(source)!r}: expected images (n, {', '.join(map(str, preprocessing.input_shape))})"
                         f", got shape {images.shape}")
    images = images.astype(np.float64)
    if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 255:
        raise BadRequest(f"calibration {str(source)!r}: pixels must be finite, within [0, 1] or [0, 255]")
    if images.max() > 1:
        images = images / 255.0
    truth = None
    if labels:
        truth = _npy(Path(labels), "labels")
        if truth.shape != (len(images),) or not np.issubdtype(truth.dtype, np.integer):
            raise BadRequest(f"labels {labels!r}: expected {len(images)} integers, got shape {truth.shape} {truth.dtype}")
    return images, truth, None


def _npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file() or path.suffix.lower() != ".npy":
        raise BadRequest(f"{what} {str(path)!r}: expected a folder or a .npy file")
    if path.stat().st_size > MAX_NPY_BYTES:
        raise BadRequest(f"{what} {str(path)!r} is larger than {MAX_NPY_BYTES >> 20} MiB")
    return read_npy(path)


def _folder(root: Path, preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(i, d) for i, d in enumerate(classes)] if classes else [(-1, root)]
    images, truth = [], []
    for label, folder in groups:
        for file in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + (".npy",)):
            if len(images) >= MAX_IMAGES:
                break
            images.append(preprocessing.load(file))
            truth.append(label)
    if not images:
        raise BadRequest(f"calibration folder {str(root)!r} holds no PNG, JPEG or .npy images")
    labelled = bool(classes)
    return (np.stack(images).astype(np.float64), np.array(truth) if labelled else None,
            [d.name for d in classes] if labelled else None)


def format_report(report: dict[str, Any]) -> list[str]:
    """The report as the lines the CLI prints."""
    lines = [f"{'layer':<22} {'kind':<8} {'shape':<14} {'bits':>5} {'cmp bits':>9} {'MACs':>9} {'rounds':>6} {'s':>7}"]
    for row in report["layers"]:
        shape = "x".join(map(str, row["shape"]))
        extra = (f"{row['compared_bits']:>9} {row['macs']:>9} {row['rounds']:>6} {row['seconds']:>7.3f}"
                 if "seconds" in row else "")
        lines.append(f"{row['name'][:22]:<22} {row['kind']:<8} {shape:<14} {row['bits']:>5} {extra}")
    p = report["predicted"]
    lines.append(f"predicted per query at {p['bits']} bits on {p['cores']} cores ({p['comparison']} comparison): "
                 f"{p['predicted_seconds']:.1f} s online, {p['rounds']} rounds, {p['bytes'] / 2**20:.1f} MiB, "
                 f"{p['compared_bits']:,} compared bits, {p['macs']:,} MACs")
    held = f"on {report['held_out_images']} held-out images"
    if "float_accuracy" in report:
        lines.append(f"float accuracy:   {report['float_accuracy']:.2%} {held}")
        lines.append(f"integer accuracy: {report['integer_accuracy']:.2%}")
    lines.append(f"argmax agreement: {report['agreement']:.2%} (integer vs float, {held})")
    lines.append(f"saved: {report['out']}")
    return lines
