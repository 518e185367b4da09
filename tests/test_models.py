"""Raw nets (SigmaMLP, UNetRaw), EDMPrecond wrapping, and the model.safetensors + model.json format."""

import json
import pickle

import pytest
import torch

from fewstep.core.precond import EDMPrecond, edm_scalings
from fewstep.core.utils import append_dims
from fewstep.errors import ModelError
from fewstep.models import SigmaMLP, UNetRaw, build_denoiser, load_model, load_teacher, save_model

MLP_SPEC = {"type": "mlp", "dim": 2, "hidden": 32, "depth": 3, "emb_dim": 16, "num_classes": 0}
UNET_SPEC = {"type": "unet", "shape": [1, 8, 8], "num_classes": 3, "block_out_channels": [8, 16],
             "norm_num_groups": 4}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny nets gain nothing from threads, and 2 threads on a shared 2-core box can make each
    small conv ~100x slower when another process holds the other core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (incl. the zero-initialised output layer) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


class _Evil:
    """A pickle whose loading would create a marker file (it must never be loaded)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickle(path, marker):
    path.write_bytes(pickle.dumps(_Evil(marker)))


# --- SigmaMLP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [0, 4])
def test_mlp_shapes_and_zero_init(num_classes, gen):
    net = SigmaMLP(2, hidden=32, depth=3, emb_dim=16, num_classes=num_classes)
    x, c = torch.randn(5, 2, generator=gen), torch.randn(5, generator=gen)
    labels = torch.eye(4)[[0, 1, 2, 3, 0]] if num_classes else None
    out = net(x, c, labels)
    assert out.shape == (5, 2)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer


def test_mlp_zero_onehot_is_unconditional(gen):
    net = _perturb(SigmaMLP(2, hidden=32, depth=2, emb_dim=16, num_classes=3))
    x, c = torch.randn(4, 2, generator=gen), torch.randn(4, generator=gen)
    assert torch.equal(net(x, c, None), net(x, c, torch.zeros(4, 3)))
    assert not torch.allclose(net(x, c, None), net(x, c, torch.eye(3)[[0, 1, 2, 0]]))


def test_mlp_block_hooks_see_post_activation(gen):
    net = _perturb(SigmaMLP(2, hidden=32, depth=3, emb_dim=16))
    seen = {}
    for i, block in enumerate(net.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, (inp[0], out)))
    net(torch.randn(6, 2, generator=gen), torch.randn(6, generator=gen))
    assert sorted(seen) == [0, 1, 2]
    for i, (inp, out) in seen.items():
        assert out.shape == (6, 32)
        assert torch.allclose(out, torch.nn.functional.silu(net.blocks[i][0](inp)))


# --- UNetRaw -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [0, 3])
def test_unet_shapes_and_zero_init(num_classes, gen):
    net = UNetRaw((1, 8, 8), num_classes=num_classes, block_out_channels=(8, 16), norm_num_groups=4)
    x, c = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, generator=gen)
    out = net(x, c, torch.eye(3) if num_classes else None)
    assert out.shape == (3, 1, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised conv_out


def test_unet_labels_and_hooks(gen):
    net = _perturb(UNetRaw((1, 8, 8), num_classes=3, block_out_channels=(8, 16), norm_num_groups=4))
    x, c = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, generator=gen)
    hits = []
    for m in [*net.unet.down_blocks, net.unet.mid_block, *net.unet.up_blocks]:
        m.register_forward_hook(lambda m, i, o: hits.append(m))
    uncond = net(x, c, None)
    assert len(hits) == 5
    assert torch.equal(uncond, net(x, c, torch.zeros(3, 3)))
    assert not torch.allclose(uncond, net(x, c, torch.eye(3)))


def test_unet_attention_defaults_to_none_for_any_depth(gen):
    D = build_denoiser({"type": "unet", "shape": [1, 8, 8], "block_out_channels": [8, 16, 16],
                        "norm_num_groups": 4, "num_classes": 0, "sigma_data": 0.5})
    assert D.spec["attention"] is None and len(D.net.unet.down_blocks) == 3
    assert D(torch.randn(2, 1, 8, 8, generator=gen), torch.ones(2)).shape == (2, 1, 8, 8)


def test_unet_pads_sizes_the_levels_do_not_divide(gen):
    """A 4x7x7 latent through 2 levels (and 6x6 through 3): padded to 8x8 inside, output cropped back
    to the input's shape; the output still depends on the content (a flipped input changes it)."""
    for shape, channels in (((4, 7, 7), (8, 16)), ((1, 6, 6), (8, 16, 16))):
        net = UNetRaw(shape, block_out_channels=channels, norm_num_groups=4)
        torch.nn.init.normal_(net.unet.conv_out.weight, std=0.1)  # conv_out starts at zero
        x = torch.randn(2, *shape, generator=gen)
        out = net(x, torch.zeros(2))
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, net(x.flip(-1), torch.zeros(2)))


def test_unet_rejects_bad_config():
    with pytest.raises(ValueError, match="one flag per level"):
        UNetRaw((1, 8, 8), block_out_channels=(8, 16), attention=(True,), norm_num_groups=4)


# --- EDMPrecond wrapping -----------------------------------------------------------------------
@pytest.mark.parametrize("spec", [MLP_SPEC, UNET_SPEC], ids=["mlp", "unet"])
def test_build_denoiser_starts_at_c_skip_x(spec, gen):
    D = build_denoiser(spec)
    assert isinstance(D, EDMPrecond) and D.sigma_data == 0.5
    x = torch.randn(4, *D.shape, generator=gen)
    sigma = torch.tensor([0.01, 0.3, 2.0, 80.0])
    c_skip = edm_scalings(sigma)[0]
    cond = torch.tensor([0, 1, -1, 2]) if spec["num_classes"] else None
    expected = append_dims(c_skip, x.ndim) * x
    assert torch.allclose(D(x, sigma, cond), expected)


def test_denoiser_label_minus_one_is_unconditional(gen):
    D = _perturb(build_denoiser({**MLP_SPEC, "num_classes": 3}))
    x, sigma = torch.randn(3, 2, generator=gen), torch.full((3,), 0.7)
    assert torch.equal(D(x, sigma, torch.full((3,), -1)), D(x, sigma, None))


# --- save / load -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,dtype", [(MLP_SPEC, torch.float64), (UNET_SPEC, torch.float32)],
                         ids=["mlp64", "unet32"])
def test_save_load_round_trip(tmp_path, spec, dtype, gen):
    D = _perturb(build_denoiser(spec).to(dtype))
    meta = {"kind": "teacher", "data": "toy", "iters": 3}
    save_model(tmp_path / "run", D, spec, meta)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.json", "model.safetensors"]
    D2, meta2 = load_model(tmp_path / "run")
    assert meta2 == meta and not D2.training
    assert D2.spec["hidden" if spec["type"] == "mlp" else "layers_per_block"] is not None  # complete spec
    x = torch.randn(4, *D.shape, generator=gen, dtype=dtype)
    sigma = torch.tensor([0.01, 0.3, 2.0, 80.0], dtype=dtype)
    cond = torch.tensor([0, 1, -1, 2]) if spec["num_classes"] else None
    with torch.no_grad():
        assert torch.equal(D(x, sigma, cond), D2(x, sigma, cond))
    D3, _ = load_teacher(tmp_path / "run" / "model.json")
    assert isinstance(D3, EDMPrecond)


def test_save_rejects_mismatched_spec(tmp_path):
    D = build_denoiser(MLP_SPEC)
    with pytest.raises(ModelError, match="does not match its spec"):
        save_model(tmp_path, D, {**MLP_SPEC, "hidden": 16}, {})
    assert not any(tmp_path.iterdir())


def _saved(tmp_path):
    save_model(tmp_path / "m", build_denoiser(MLP_SPEC), MLP_SPEC, {})
    return tmp_path / "m"


def _edit_json(d, fn):
    doc = json.loads((d / "model.json").read_text())
    fn(doc)
    (d / "model.json").write_text(json.dumps(doc))


def test_load_errors_json(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelError, match="no model.json"):
        load_model(tmp_path)
    d = _saved(tmp_path)
    (d / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        load_model(d)
    d = _saved(tmp_path)
    _edit_json(d, lambda doc: doc.pop("spec"))
    with pytest.raises(ModelError, match="required key"):
        load_model(d)
    d = _saved(tmp_path)
    _edit_json(d, lambda doc: doc.pop("format"))
    with pytest.raises(ModelError, match="not a fewstep model.json"):
        load_model(d)
    d = _saved(tmp_path)
    _edit_json(d, lambda doc: doc["spec"].update(type="transformer"))
    with pytest.raises(ModelError, match="unknown"):
        load_model(d)
    d = _saved(tmp_path)
    _edit_json(d, lambda doc: doc["spec"].update(hiden=3))
    with pytest.raises(ModelError, match="unknown key"):
        load_model(d)


def test_load_errors_weights(tmp_path):
    d = _saved(tmp_path)
    _edit_json(d, lambda doc: doc["spec"].update(hidden=64))
    with pytest.raises(ModelError, match=r"model.safetensors does not match model.json \(.*shape"):
        load_model(d)
    d = _saved(tmp_path)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_model(d)
    (d / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors"):
        load_model(d)


def test_pickles_are_refused_never_loaded(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"

    def boom(*a, **k):
        raise AssertionError("a pickle loader was called")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, boom)
    for name in ("teacher.pt", "teacher.pth", "teacher.pkl", "teacher.ckpt", "teacher.bin"):
        _plant_pickle(tmp_path / name, marker)
        with pytest.raises(ModelError, match="safetensors"):
            load_teacher(tmp_path / name)
    only_pickle = tmp_path / "dir"
    only_pickle.mkdir()
    _plant_pickle(only_pickle / "model.pt", marker)
    with pytest.raises(ModelError, match="safetensors"):
        load_teacher(only_pickle)
    d = _saved(tmp_path)  # model.json whose weights are a pickle
    (d / "model.safetensors").unlink()
    _plant_pickle(d / "model.pkl", marker)
    with pytest.raises(ModelError, match="safetensors"):
        load_teacher(d)
    assert not marker.exists()


def test_load_teacher_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_teacher(tmp_path / "nope")
    with pytest.raises(ModelError, match="not a model directory"):
        load_teacher(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a model"):
        load_teacher(tmp_path / "notes.txt")
