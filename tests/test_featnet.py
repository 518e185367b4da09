"""The digits feature network: shipped weights, accuracy, batch independence, deterministic retraining."""

import json

import pytest
import torch

from fewstep.data import load_dataset
from fewstep.errors import ModelError
from fewstep.models.featnet import DigitsFeatNet, default_weights_path, load_featnet, sha256_file
from fewstep.train.featnet import accuracy, deterministic_cpu, random_shift, train_featnet


@pytest.fixture(scope="module")
def net():
    return load_featnet()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits8", conditional=True)


def test_shipped_weights_and_metadata(net):
    path = default_weights_path()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256_file(path)
    assert meta["architecture"]["feature_dim"] == 128 and meta["test_accuracy"] >= 0.97
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_shipped_weights_classify_test_split(net, digits):
    acc = accuracy(net, digits.x_test, digits.y_test)
    assert acc >= 0.97
    meta = json.loads(default_weights_path().with_suffix(".json").read_text())
    assert abs(acc - meta["test_accuracy"]) < 1e-9


def test_features_shape_and_batch_independence(net, digits):
    x = digits.x_test[:64]
    with torch.no_grad():
        f = net.features(x)
        alone = net.features(x[:3])
        shuffled = net.features(torch.cat([x[40:], x[:3]]))[-3:]
        logits = net(x)
    assert f.shape == (64, 128) and f.dtype == torch.float32 and logits.shape == (64, 10)
    assert torch.allclose(alone, f[:3], atol=1e-5) and torch.allclose(shuffled, f[:3], atol=1e-5)
    assert torch.allclose(net.head(f), logits, atol=1e-5)


def test_random_shift_moves_by_at_most_one_pixel():
    x = torch.full((50, 1, 8, 8), -1.0)
    x[:, 0, 3:5, 3:5] = 1.0
    y = random_shift(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and ((y == 1).sum(dim=(1, 2, 3)) == 4).all()
    assert not torch.equal(x, y)


def test_deterministic_cpu_restores_state():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    before = torch.get_rng_state()
    with deterministic_cpu(3):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        torch.rand(5)
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == det
    assert torch.equal(torch.get_rng_state(), before)


def test_retrain_is_bit_for_bit(tmp_path):
    logs = []
    a = train_featnet(tmp_path / "a" / "f.safetensors", seed=0, epochs=2, log=logs.append)
    b = train_featnet(tmp_path / "b" / "f.safetensors", seed=0, epochs=2, log=lambda s: None)
    assert a["sha256"] == b["sha256"] and a["test_accuracy"] == b["test_accuracy"]
    assert (tmp_path / "a" / "f.safetensors").read_bytes() == (tmp_path / "b" / "f.safetensors").read_bytes()
    meta = json.loads((tmp_path / "a" / "f.json").read_text())
    assert meta["epochs"] == 2 and meta["seed"] == 0 and meta["sha256"] == a["sha256"]
    assert not list((tmp_path / "a").glob("*.tmp")) and logs
    assert isinstance(load_featnet(tmp_path / "a" / "f.safetensors"), DigitsFeatNet)
    c = train_featnet(tmp_path / "c" / "f.safetensors", seed=1, epochs=2, log=lambda s: None)
    assert c["sha256"] != a["sha256"]


def test_corrupt_or_missing_weights_raise(tmp_path):
    with pytest.raises(ModelError, match="missing"):
        load_featnet(tmp_path / "none.safetensors")
    src = default_weights_path()
    (tmp_path / "f.json").write_text(src.with_suffix(".json").read_text())
    data = bytearray(src.read_bytes())
    data[-1] ^= 1
    (tmp_path / "f.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_featnet(tmp_path / "f.safetensors")
