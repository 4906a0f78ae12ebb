"""The torch ICNN: the patent's layer counts, the wiring table, the layer summary and training."""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torch import nn

from he_cnn.training.data import Dataset
from he_cnn.training.icnn import ICNN, WIRING, format_summary
from he_cnn.training.train import random_shift, train_icnn


def test_layer_counts_match_the_patent():
    model = ICNN()
    convs = Counter(m.kernel_size[0] for m in model.modules() if isinstance(m, nn.Conv2d))
    pools = Counter(m.kernel_size for m in model.modules() if isinstance(m, nn.MaxPool2d))
    assert convs == {1: 5, 3: 3, 5: 2, 7: 1}
    assert sum(convs.values()) == 11
    assert pools == {2: 1, 3: 3}
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


def test_wiring_names_every_module_once_in_execution_order():
    model = ICNN()
    names = [name for name, _ in WIRING]
    assert sorted(names) == sorted(name for name, _ in model.named_children())
    produced = {"input"}
    for name, inputs in WIRING:
        assert set(inputs) <= produced, name
        produced.add(name)


def test_forward_shapes():
    model = ICNN()
    tensors = model.forward_all(torch.zeros(3, 1, 16, 16))
    assert tensors["stem_relu"].shape == (3, 4, 8, 8)
    assert tensors["a_concat"].shape == (3, 16, 8, 8)
    assert tensors["mid_relu"].shape == (3, 16, 4, 4)
    assert tensors["b_concat"].shape == (3, 32, 4, 4)
    assert tensors["flatten"].shape == (3, 512)
    assert model(torch.zeros(3, 1, 16, 16)).shape == (3, 10)


def test_summary_counts_macs_relus_and_pool_windows():
    rows = ICNN().summary()
    assert [r.name for r in rows] == [name for name, _ in WIRING]
    by_name = {r.name: r for r in rows}
    assert by_name["stem_conv"].macs == 16 * 16 * 4 * 49
    assert by_name["fc"].macs == 512 * 10
    assert by_name["b_relu"].relus == 512
    assert by_name["mid_pool"].pool_windows == 16 * 4 * 4
    assert sum(r.macs for r in rows) == 171008
    assert sum(r.relus for r in rows) == 256 + 256 + 128 + 256 + 512
    assert sum(r.pool_windows for r in rows) == 4 * 256
    table = format_summary(rows)
    assert table.count("\n") == len(rows) + 2
    assert "| **total** | | | 171008 | 1408 | 1024 |" in table


def test_float_accuracy(trained_icnn):
    _, result, _ = trained_icnn
    assert result.float_test_accuracy >= 0.97
    assert not result.model.training


def test_training_is_deterministic_and_restores_torch_settings():
    rng = np.random.default_rng(0)
    images = rng.random((40, 1, 16, 16), dtype=np.float32)
    labels = np.arange(40, dtype=np.int64) % 2
    tiny = Dataset(images[:30], labels[:30], images[30:], labels[30:], ["a", "b"], 16)
    threads, state = torch.get_num_threads(), torch.get_rng_state()
    first, second = (train_icnn(tiny, epochs=1, seed=3) for _ in range(2))
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.are_deterministic_algorithms_enabled()


def test_random_shift_moves_images_by_at_most_one_pixel():
    image = torch.zeros(64, 1, 5, 5)
    image[:, :, 2, 2] = 1.0
    shifted = random_shift(image)
    for one in shifted:
        (y, x), = one[0].nonzero().tolist()
        assert abs(y - 2) <= 1 and abs(x - 2) <= 1
