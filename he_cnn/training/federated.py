"""Several owners train one ICNN together: local training, fixed-point updates, encrypted averaging (FedAvg).

A session has K owners and R rounds. Every owner starts from the same weights (drawn from the session's
seed). In each round each owner trains its copy of the model on its own images for a few epochs
(:func:`~he_cnn.training.train.train_classifier`, from the current average), turns every weight into a
fixed-point integer ``round(w 2^f)`` (|.| < 2^b, the layout's bound; a weight beyond it is an
:class:`~he_cnn.errors.EncodingOverflow`, never clipped silently) and hands it to an
:class:`Aggregator`; what comes back is the weighted sum of all owners' integers under the consortium's
key, decrypted by each owner (:mod:`he_cnn.protocols.aggregate`). Each owner divides by the total
sample count (rounding to the nearest integer, halves up) and loads the average ``/ 2^f`` as its next
starting point. The weights n_k are the owners' training-set sizes, public within the session.

Where the updates go is the aggregator's business: :class:`InProcessAggregator` runs both clouds in
this process (tests, the accuracy figures), the owner's command line one over HTTP. One round's code
(:func:`train_rounds`) serves both ways of running a session: :func:`run_session` plays all K owners in
one process, an owner on its own machine plays only itself (``he-cnn owner federate join``). The data
owners' splits of a data set (:func:`split_dataset`): ``iid`` (a seeded shuffle dealt evenly) or
``label`` (non-IID: the images sorted by label cut into 2K shards, two per owner, so each owner sees
only a few digits). Simulated owners score on the same public test split, a real owner on its own.
"""
from __future__ import annotations

import dataclasses
import time
from fractions import Fraction
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from he_cnn.crypto.paillier import KeyPair
from he_cnn.errors import BadRequest, EncodingOverflow
from he_cnn.graph.integer_model import IntegerModel, infer_shapes_and_bounds
from he_cnn.graph.layers import LinearLayer
from he_cnn.protocols import aggregate
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.protocols.common import S1Context
from he_cnn.training.data import Dataset
from he_cnn.training.train import predict_float, train_classifier
from he_cnn.training.zoo import build_model

#: how the owners' data is split
SPLITS = ("iid", "label")
#: fractional bits of a weight's fixed-point integer
FRACTION_BITS = 16
#: |fixed-point weight| < 2^VALUE_BITS: weights up to 256 in absolute value
VALUE_BITS = 24


@dataclass(frozen=True)
class FederatedSettings:
    """A session: ``owners`` (K), ``rounds`` (R), local epochs per round, the split, seed and learning rate."""

    owners: int = 3
    rounds: int = 6
    local_epochs: int = 5
    split: str = "iid"
    seed: int = 0
    lr: float = 1e-2
    batch_size: int = 8
    #: each round's peak learning rate (of its one-cycle schedule) is ``lr * lr_decay ** round``: later
    #: rounds move the average less (K = 3, IID: 98.0% after 6 rounds at 0.8, 97.6% without decay)
    lr_decay: float = 0.8
    fraction_bits: int = FRACTION_BITS
    value_bits: int = VALUE_BITS

    def __post_init__(self) -> None:
        for name in ("owners", "rounds", "local_epochs", "batch_size"):
            value = getattr(self, name)
            if type(value) is not int or value < (2 if name == "owners" else 1):
                raise BadRequest(f"{name} must be an int >= {2 if name == 'owners' else 1}, got {value!r}")
        if not 0.0 < self.lr_decay <= 1.0 or not self.lr > 0.0:
            raise BadRequest(f"need lr > 0 and 0 < lr_decay <= 1, got {self.lr!r}, {self.lr_decay!r}")
        if self.split not in SPLITS:
            raise BadRequest(f"unknown split {self.split!r}: expected one of {SPLITS}")
        if not 0 <= self.fraction_bits < self.value_bits <= aggregate.MAX_VALUE_BITS:
            raise BadRequest(f"need 0 <= fraction_bits < value_bits <= {aggregate.MAX_VALUE_BITS}")

    @property
    def total_epochs(self) -> int:
        """Epochs each owner trains in all: what centralised training gets for a fair comparison."""
        return self.rounds * self.local_epochs


def split_dataset(dataset: Dataset, owners: int, split: str, seed: int = 0) -> list[Dataset]:
    """The owners' training sets (``iid`` or non-IID ``label`` shards); each keeps the common test split."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset.y_train))
    if split == "iid":
        parts = np.array_split(order, owners)
    elif split == "label":
        by_label = order[np.argsort(dataset.y_train[order], kind="stable")]
        shards = np.array_split(by_label, 2 * owners)
        dealt = rng.permutation(2 * owners)
        parts = [np.concatenate([shards[dealt[2 * k]], shards[dealt[2 * k + 1]]]) for k in range(owners)]
    else:
        raise BadRequest(f"unknown split {split!r}: expected one of {SPLITS}")
    if min(len(p) for p in parts) < 1:
        raise BadRequest(f"{len(dataset.y_train)} training images cannot be split between {owners} owners")
    return [dataclasses.replace(dataset, x_train=dataset.x_train[np.sort(p)], y_train=dataset.y_train[np.sort(p)])
            for p in parts]


def to_fixed(model: torch.nn.Module, fraction_bits: int, value_bits: int) -> np.ndarray:
    """Every entry of ``model``'s state, in state order, as round(w 2^f) (object ints, |v| < 2^value_bits)."""
    flat = torch.cat([t.detach().double().reshape(-1) for t in model.state_dict().values()]).numpy()
    ints = np.rint(np.ldexp(flat, fraction_bits))
    if ints.size and np.abs(ints).max() >= 2.0 ** value_bits:
        raise EncodingOverflow(f"a weight of {np.abs(flat).max():g} does not fit {value_bits - fraction_bits} "
                               f"integer bits of the fixed-point update")
    return ints.astype(np.int64).astype(object)


def split_state(model: torch.nn.Module, values: np.ndarray) -> dict[str, np.ndarray]:
    """A flat array cut into ``model``'s state entries, in its state order and shapes."""
    state = model.state_dict()
    expected = sum(t.numel() for t in state.values())
    if expected != len(values):
        raise BadRequest(f"{len(values)} values for a model of {expected}")
    parts, start = {}, 0
    for name, tensor in state.items():
        parts[name] = np.asarray(values[start:start + tensor.numel()]).reshape(tuple(tensor.shape))
        start += tensor.numel()
    return parts


def from_fixed(model: torch.nn.Module, values: np.ndarray, fraction_bits: int) -> dict[str, torch.Tensor]:
    """The state dict ``values / 2^f`` in ``model``'s state order and shapes."""
    floats = np.ldexp(np.asarray(values, dtype=np.float64), -fraction_bits)
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    return {name: torch.from_numpy(part).to(dtypes[name]) for name, part in split_state(model, floats).items()}


@dataclass(frozen=True)
class AggregationRound:
    """What one aggregation cost and returned: the weighted sums (all any owner learns) and the costs."""

    sums: np.ndarray
    encrypt_seconds: tuple[float, ...]
    upload_seconds: tuple[float, ...]
    upload_bytes: tuple[int, ...]
    s1_seconds: float
    cloud_bytes: int  # between S1 and S2
    download_bytes: int  # to each owner
    decrypt_seconds: float  # per owner


class Aggregator(Protocol):
    """Takes the fixed-point updates of the owners this process plays (all K when simulated) to S1 and
    returns the weighted sum of all K owners' updates, as each owner decrypts it."""

    key_bits: int

    def aggregate(self, updates: Sequence[np.ndarray], layout: aggregate.AggregationLayout) -> AggregationRound:
        ...


class InProcessAggregator:
    """Both clouds in this process: S1's context (its channel to S2) and the consortium's key pair. Uploads
    and the download go through the wire encoding, so their bytes and seconds are counted as over HTTP."""

    def __init__(self, s1: S1Context, consortium: KeyPair):
        self.s1 = s1
        self.consortium = consortium
        self.key_bits = s1.public_key.bits

    def aggregate(self, updates: Sequence[np.ndarray], layout: aggregate.AggregationLayout) -> AggregationRound:
        pk = self.s1.public_key
        received, encrypt_s, upload_s, upload_b = [], [], [], []
        for values in updates:
            started = time.perf_counter()
            packs = aggregate.encrypt_update(pk, values, layout)
            encrypt_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            payload = packs.serialize()
            received.append(EncryptedTensor.deserialize(pk, payload))
            upload_s.append(time.perf_counter() - started)
            upload_b.append(len(payload))
        before = self.s1.channel.stats.bytes_to_s2 + self.s1.channel.stats.bytes_to_s1
        started = time.perf_counter()
        total = aggregate.aggregate_updates(received, layout)
        result = aggregate.reencrypt_for_consortium(self.s1, total, layout, self.consortium.public)
        s1_seconds = time.perf_counter() - started
        cloud_bytes = self.s1.channel.stats.bytes_to_s2 + self.s1.channel.stats.bytes_to_s1 - before
        download = result.serialize()
        started = time.perf_counter()
        sums = aggregate.decrypt_sum(self.consortium.private,
                                     EncryptedTensor.deserialize(self.consortium.public, download), layout)
        return AggregationRound(sums, tuple(encrypt_s), tuple(upload_s), tuple(upload_b), s1_seconds, cloud_bytes,
                                len(download), time.perf_counter() - started)


@dataclass(frozen=True)
class RoundReport:
    """One round: the average's float test accuracy, each owner's training seconds, the aggregation's costs."""

    round: int
    float_accuracy: float
    train_seconds: tuple[float, ...]
    aggregation: AggregationRound

    def to_json(self) -> dict[str, Any]:
        a = self.aggregation
        return {"round": self.round, "float_accuracy": self.float_accuracy,
                "owners": [{"train_s": t, "encrypt_s": e, "upload_s": u, "upload_bytes": b, "decrypt_s": a.decrypt_seconds}
                           for t, e, u, b in zip(self.train_seconds, a.encrypt_seconds, a.upload_seconds,
                                                 a.upload_bytes)],
                "s1_aggregation_s": a.s1_seconds, "cloud_bytes": a.cloud_bytes, "download_bytes": a.download_bytes}


@dataclass(frozen=True)
class FederatedReport:
    """A session: its settings, the owners' weights, every round, and the final average as a float model."""

    settings: FederatedSettings
    samples: tuple[int, ...]
    rounds: tuple[RoundReport, ...]
    model: torch.nn.Module  # the final average, in eval mode

    def to_json(self) -> dict[str, Any]:
        return {"settings": dataclasses.asdict(self.settings), "samples": list(self.samples),
                "rounds": [r.to_json() for r in self.rounds]}


def session_shape(dataset: Dataset, settings: FederatedSettings, arch: str = "icnn") -> tuple[int, tuple[int, ...]]:
    """What a session declares to S1 before any training: the values per update and the owners' weights."""
    return model_size(dataset, arch), tuple(len(p.y_train) for p in split_dataset(dataset, settings.owners,
                                                                                   settings.split, settings.seed))


def model_size(dataset: Dataset, arch: str = "icnn") -> int:
    """The values in one update: the entries of ``arch``'s state for ``dataset``'s images and classes."""
    return state_size(build_model(arch, dataset.x_train.shape[1:], len(dataset.classes)))


def state_size(model: torch.nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def run_session(dataset: Dataset, settings: FederatedSettings, aggregator: Aggregator,
                arch: str = "icnn") -> FederatedReport:
    """R rounds of local training and encrypted averaging for all K owners, each on its split of ``dataset``;
    the accuracy of each round's average on the common test split."""
    parts = split_dataset(dataset, settings.owners, settings.split, settings.seed)
    return train_rounds(parts, tuple(len(p.y_train) for p in parts), dataset, settings, aggregator, arch)


def train_rounds(parts: Sequence[Dataset], weights: tuple[int, ...], test: Dataset, settings: FederatedSettings,
                 aggregator: Aggregator, arch: str = "icnn",
                 on_round: Callable[[RoundReport], None] = lambda _: None) -> FederatedReport:
    """The rounds of a session for the owners this process plays: ``parts`` are their training sets, in the
    order the ``aggregator`` uploads them (all K owners when simulated, one on an owner's own machine);
    ``weights`` are all K owners' sample counts (the session's). Each round every part trains from the
    current average, the aggregator returns the weighted sum of all K updates, and the rounded average
    becomes the next start; ``on_round`` hears of each round as it ends, scored on ``test``'s test split."""
    shape = test.x_train.shape[1:]
    model = build_model(arch, shape, len(test.classes))
    layout = aggregate.AggregationLayout(state_size(model), settings.value_bits, tuple(weights), aggregator.key_bits)
    current: dict[str, torch.Tensor] | None = None  # round 0: every owner draws the same weights from the seed
    reports = []
    for r in range(settings.rounds):
        updates, seconds = [], []
        for part in parts:
            local = build_model(arch, shape, len(test.classes))
            trained = train_classifier(local, part, settings.local_epochs, settings.seed + r,
                                       settings.lr * settings.lr_decay ** r, settings.batch_size, initial_state=current)
            seconds.append(trained.seconds)
            updates.append(to_fixed(local, settings.fraction_bits, settings.value_bits))
        result = aggregator.aggregate(updates, layout)
        current = from_fixed(model, aggregate.divide_rounded(result.sums, layout.total), settings.fraction_bits)
        model.load_state_dict(current)
        model.eval()
        accuracy = float(np.mean(predict_float(model, test.x_test) == test.y_test))
        reports.append(RoundReport(r + 1, accuracy, tuple(seconds), result))
        on_round(reports[-1])
    return FederatedReport(settings, tuple(weights), tuple(reports), model)


def scale_runs(ideal: IntegerModel, model: torch.nn.Module, total: int, fraction_bits: int
               ) -> list[tuple[str, int, int, int]]:
    """Per state entry of ``model`` (its order): (name, count, num, den), the factor num / den that turns the
    session's weighted sum S = T 2^f w into ``ideal``'s integers (:func:`~he_cnn.training.quantize.quantize_icnn`:
    weights w 2^shift, biases b input_max 2^e)."""
    shifts, exponents = ideal.meta["weight_shifts"], ideal.meta["scale_exponents"]
    runs = []
    for name, tensor in model.state_dict().items():
        layer, part = name.rsplit(".", 1)
        factor = Fraction(2) ** shifts[layer] if part == "weight" else ideal.input_max * Fraction(2) ** exponents[layer]
        factor /= total << fraction_bits
        runs.append((name, tensor.numel(), factor.numerator, factor.denominator))
    return runs


def served_model(ideal: IntegerModel, values: np.ndarray, model: torch.nn.Module) -> IntegerModel:
    """``ideal`` with the integers S1 actually serves (``values`` in ``model``'s state order), its bounds anew."""
    by_name = split_state(model, np.asarray(values, dtype=object))
    layers = tuple(dataclasses.replace(layer, weight=by_name[f"{layer.name}.weight"], bias=by_name[f"{layer.name}.bias"])
                   if isinstance(layer, LinearLayer) else layer for layer in ideal.layers)
    shapes, bounds = infer_shapes_and_bounds(layers, ideal.input_name, ideal.input_shape, ideal.input_max)
    return dataclasses.replace(ideal, layers=layers, shapes=shapes, bounds=bounds, bits={})
