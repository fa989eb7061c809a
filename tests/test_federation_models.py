"""Models and their flat weight vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federation.models import build_model, get_weights, set_weights, weights_hash


@pytest.mark.parametrize("name, expected", [("logreg", 8), ("mlp", 7 * 5 + 5 + 5 + 1)])
def test_weight_vector_length_and_logit_shape(name, expected):
    model = build_model(name, 7, hidden=5, seed=1)
    flat = get_weights(model)

    assert flat.dtype == np.float32 and flat.shape == (expected,)
    assert model(torch.zeros(3, 7)).shape == (3,)


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = get_weights(build_model("mlp", 4, hidden=3, seed=9))
    after = torch.rand(1)
    b = get_weights(build_model("mlp", 4, hidden=3, seed=9))
    c = get_weights(build_model("mlp", 4, hidden=3, seed=10))

    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert torch.equal(before, after)


def test_set_weights_round_trip():
    model = build_model("mlp", 4, hidden=3)
    target = np.arange(get_weights(model).size, dtype=np.float32) / 10
    set_weights(model, target)

    assert np.array_equal(get_weights(model), target)


@pytest.mark.parametrize("size", [8, 10])
def test_set_weights_wrong_size_raises(size):
    model = build_model("mlp", 4, hidden=3)
    with pytest.raises(ValueError, match=r"needs \(19,\)"):
        set_weights(model, np.zeros(size, dtype=np.float32))


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match="unknown model 'tree'"):
        build_model("tree", 3)


def test_weights_hash_is_sha256_of_float32_le_bytes():
    import hashlib

    flat = np.array([1.0, -2.5, 3.25], dtype=np.float64)
    expected = hashlib.sha256(np.array([1.0, -2.5, 3.25], "<f4").tobytes()).hexdigest()

    assert weights_hash(flat) == expected
    assert weights_hash(flat.astype(">f4")) == expected
    assert weights_hash(flat + 1e-3) != expected
