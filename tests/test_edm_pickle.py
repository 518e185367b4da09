"""NVlabs/edm and edm2 network pickles read as data, never executed (specs/edm_checkpoints.md).

The test pickles have the real persistence structure: every network module pickles as
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = dict(type='class',
version, module_src, class_name, state)`` and ``state`` its ``__dict__`` plus ``_init_args`` /
``_init_kwargs`` (EDM's ``persistent_class.__reduce__``); ``ModuleDict``, tensors and parameters are
pickled by torch itself; the snapshot is EDM's ``dict(ema=..., loss_fn=..., augment_pipe=...,
dataset_kwargs=...)`` or EDM2's ``dnnlib.EasyDict`` with fp16 weights. ``torch_utils`` and ``dnnlib``
exist as fake modules only while a pickle is WRITTEN; ``module_src`` would create a marker file if it
were ever executed.
"""

from __future__ import annotations

import builtins
import copy
import json
import math
import pickle
import subprocess
import sys
import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.cli import main
from fewstep.core.precond import edm_scalings
from fewstep.errors import ModelError
from fewstep.models import edm_pickle
from fewstep.models.edm_precond import EDM2PrecondNet, EDMPrecondNet, VEPrecondNet, VPPrecondNet
from fewstep.models.io import build_denoiser, load_model, load_teacher, save_model
from fewstep.models.taps import bottleneck_path, edm_taps, forward_with_taps

FOREIGN = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")
FEWSTEP_ONLY = {"spec", "shape", "num_classes", "boundary", "boundary_sigma_min"}  # not in EDM's __dict__

SONG = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}
DDPMPP = {**SONG, "embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
          "channel_mult_noise": 1, "resample_filter": [1, 1], "augment_dim": 9}  # EDM's CIFAR DDPM++ flags
NCSNPP = {**SONG, "embedding_type": "fourier", "encoder_type": "residual", "decoder_type": "standard",
          "channel_mult_noise": 2, "resample_filter": [1, 3, 3, 1]}
SKIPS = {**SONG, "encoder_type": "skip", "decoder_type": "skip"}
ADM = {"model_type": "DhariwalUNet", "model_channels": 16, "channel_mult": [2, 8], "num_blocks": 1,
       "attn_resolutions": [4], "dropout": 0.0}  # 128 channels at 4x4: two 64-channel heads
EDM2 = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
        "channels_per_head": 8, "logvar_channels": 16}

# (class, label_dim, image channels, init kwargs beyond the interface)
CASES = {
    "vp_ddpmpp_cond": (VPPrecondNet, 10, 1, {"model_type": "SongUNet", "beta_d": 18.0, "beta_min": 0.2,
                                             **DDPMPP}),
    "vp_ddpmpp_uncond": (VPPrecondNet, 0, 1, {"model_type": "SongUNet", **DDPMPP}),
    "ve_ncsnpp_uncond": (VEPrecondNet, 0, 1, {"model_type": "SongUNet", "sigma_max": 90.0, **NCSNPP}),
    "edm_ncsnpp_cond": (EDMPrecondNet, 10, 1, {"model_type": "SongUNet", "sigma_data": 0.6, **NCSNPP}),
    "edm_skip_uncond": (EDMPrecondNet, 0, 3, {"model_type": "SongUNet", **SKIPS}),
    "edm_adm_cond": (EDMPrecondNet, 10, 1, ADM),
    "edm2_cond_fp16": (EDM2PrecondNet, 10, 4, EDM2),
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- writing pickles with EDM's structure ----------------------------------------------------------
class _Persistent:
    """Pickles exactly like an EDM persistent object (torch_utils/persistence.py ``__reduce__``)."""

    reconstruct = None  # the stand-in reconstructor, set while a pickle is written
    module_src = ""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=_Persistent.module_src, class_name=self.class_name,
                    state=self.state)
        return (_Persistent.reconstruct, (meta,))


class _EDMPickler(pickle.Pickler):
    """fewstep's EDM modules pickled as persistent objects; everything else as torch/pickle do it."""

    def __init__(self, f, top, init_kwargs, edit=None):
        super().__init__(f, protocol=4)
        self.top, self.init_kwargs, self.edit = top, init_kwargs, edit

    def reducer_override(self, obj):
        if not (isinstance(obj, nn.Module) and hasattr(type(obj), "EDM_CLASS")):
            return NotImplemented
        state = {k: v for k, v in obj.__dict__.items() if k not in FEWSTEP_ONLY}
        if isinstance(obj, (VPPrecondNet, VEPrecondNet)):
            state.pop("sigma_data")
        if "skip_scale" in state:  # EDM stores np.sqrt(0.5): exercises numpy's scalar reconstructor
            state["skip_scale"] = np.float64(state["skip_scale"])
        state["_init_args"] = ()
        state["_init_kwargs"] = copy.deepcopy(self.init_kwargs) if obj is self.top else {}
        if self.edit is not None:
            self.edit(obj, state)
        return _Persistent(obj.EDM_CLASS, state).__reduce__()


@contextmanager
def _edm_modules_while_writing(marker):
    mods = {name: types.ModuleType(name) for name in FOREIGN}

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - never called: only its name is pickled
        raise AssertionError("the stand-in reconstructor ran")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    easydict = type("EasyDict", (dict,), {"__module__": "dnnlib.util", "__qualname__": "EasyDict"})
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    mods["torch_utils"].persistence = mods["torch_utils.persistence"]
    mods["dnnlib.util"].EasyDict = easydict
    mods["dnnlib"].util = mods["dnnlib.util"]
    assert not any(name in sys.modules for name in FOREIGN)
    sys.modules.update(mods)
    _Persistent.reconstruct = _reconstruct_persistent_obj
    _Persistent.module_src = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    try:
        yield easydict
    finally:
        for name in FOREIGN:
            sys.modules.pop(name, None)
        _Persistent.reconstruct = None


def write_edm_pickle(path, net, init_kwargs, marker, edm2=False, extra=None, edit=None):
    with _edm_modules_while_writing(marker) as EasyDict:
        dataset = EasyDict(class_name="training.dataset.ImageFolderDataset", path="datasets/digits.zip",
                           use_labels=bool(init_kwargs["label_dim"]), xflip=False)
        if edm2:  # EDM2 training_loop: an EasyDict, the ema network cast to float16
            encoder = _Persistent("StabilityVAEEncoder", {"vae_name": "stabilityai/sd-vae-ft-mse",
                                                          "scale": np.float32([0.12, 0.11, 0.13, 0.15]),
                                                          "bias": np.float32([-0.7, -0.35, 0.0, 0.3]),
                                                          "batch_size": 8, "_vae": None})
            loss = _Persistent("EDM2Loss", {"P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5})
            snap = EasyDict(encoder=encoder, dataset_kwargs=dataset, loss_fn=loss)
            snap["ema"] = net
        else:  # EDM training_loop
            snap = dict(ema=net, loss_fn=_Persistent("VPLoss", {"beta_d": 19.9, "beta_min": 0.1}),
                        augment_pipe=None, dataset_kwargs=dict(dataset))
        snap.update(extra or {})
        with open(path, "wb") as f:
            _EDMPickler(f, net, init_kwargs, edit).dump(snap)
    return path


def _perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct random values in every floating tensor, so that a swapped or skipped one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return module


def _direct(case: str):
    """The network built directly from its constructor (no spec, no pickle), random weights."""
    cls, label_dim, channels, extra = CASES[case]
    kwargs = {"img_resolution": 8, "img_channels": channels, "label_dim": label_dim, "use_fp16": False,
              **copy.deepcopy(extra)}
    torch.manual_seed(0)
    D = _perturb(cls(**kwargs))
    return D, kwargs


def _pickled(tmp_path, case: str, **kw):
    D, kwargs = _direct(case)
    edm2 = CASES[case][0] is EDM2PrecondNet
    if edm2:  # the file holds float16 weights; the reference net holds the same values
        D = D.half().float()
    saved = copy.deepcopy(D).half() if edm2 else D
    path = write_edm_pickle(tmp_path / f"{case}.pkl", saved, kwargs, tmp_path / "SOURCE_WAS_RUN", edm2, **kw)
    return path, D, kwargs


def _foreign_modules():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("torch_utils", "dnnlib", "training"))


def _one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


# --- the structure of the test pickles is EDM's ---------------------------------------------------------
def test_test_pickles_reference_only_the_globals_of_an_edm_snapshot(tmp_path):
    """The globals our test pickles reference are those of a real EDM / EDM2 snapshot (spec section 1),
    and the module source a normal unpickle would exec does create the marker (so its absence is
    evidence)."""
    seen = set()

    class Recording(edm_pickle.RestrictedUnpickler):
        def find_class(self, module, name):
            seen.add(f"{module}.{name}")
            return super().find_class(module, name)

    for case in ("vp_ddpmpp_cond", "edm2_cond_fp16"):
        path, _, _ = _pickled(tmp_path, case)
        with open(path, "rb") as f:
            tree = Recording(f, path).load()
    assert {"torch_utils.persistence._reconstruct_persistent_obj", "dnnlib.util.EasyDict",
            "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
            "torch.storage._load_from_bytes", "torch.nn.modules.container.ModuleDict",
            "collections.OrderedDict", "numpy.dtype", "numpy.ndarray"} <= seen
    assert {f"{m}.{n}" for m, n in edm_pickle.ALLOWED} >= seen
    assert tree["ema"]["class_name"] == "Precond" and "module_src" in tree["ema"]
    marker = tmp_path / "SOURCE_WAS_RUN"
    assert not marker.exists()
    exec(compile(tree["ema"]["module_src"], "<pickled module_src>", "exec"), {})
    assert marker.exists()


# --- loaded == directly built ------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_loaded_network_equals_the_directly_built_one(tmp_path, monkeypatch, case):
    path, D, kwargs = _pickled(tmp_path, case)
    compiled = []
    real_compile = builtins.compile
    monkeypatch.setattr(builtins, "compile", lambda *a, **k: compiled.append(a[1:2]) or real_compile(*a, **k))
    L, meta = load_teacher(path)
    assert compiled == [] and _foreign_modules() == []
    assert not (tmp_path / "SOURCE_WAS_RUN").exists()
    C, K = kwargs["img_channels"], kwargs["label_dim"]
    assert (L.shape, L.num_classes, meta["data"]) == ((C, 8, 8), K, {"shape": [C, 8, 8], "num_classes": K})
    assert (L.sigma_min, L.sigma_max, L.sigma_data) == (D.sigma_min, D.sigma_max, D.sigma_data)
    assert not L.training
    L, D = L.double(), D.double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, C, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.tensor([0, 3, -1, 9]) if K else None
    for sigma in (0.01, 0.3, 2.0, 40.0):
        a, b = L(x, sigma, cond), D(x, sigma, cond)
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6, sigma
    if K:  # the label reaches the network (not vacuous)
        assert not torch.allclose(L(x, 2.0, cond), L(x, 2.0, torch.tensor([1, 3, -1, 9])))


def test_edm2_meta_records_the_encoder_and_the_weights_were_float16(tmp_path):
    path, D, _ = _pickled(tmp_path, "edm2_cond_fp16")
    L, meta = load_teacher(path)
    assert meta["edm2_encoder"] == "StabilityVAEEncoder" and meta["class_name"] == "Precond"
    assert next(L.parameters()).dtype == torch.float32  # fp16 in the file, float32 in memory
    assert all(torch.equal(a, b) for a, b in zip(L.state_dict().values(), D.state_dict().values()))


# --- the preconditioners are EDM's formulas ------------------------------------------------------------
class _Probe(nn.Module):
    """Stands in for the raw network: F = sin(x_in) + c_noise, recording what it was given."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, c_noise, labels=None):
        self.seen = (x, c_noise, labels)
        return self.w * x.sin() + c_noise[:, None, None, None]


def _probed(cls, **kw):
    D = cls(img_resolution=8, img_channels=1, label_dim=3, model_type="SongUNet", **SONG, **kw).double()
    D.model = _Probe()
    return D


def test_precond_formulas_are_edm_table_1():
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.02, 1.5, 70.0], dtype=torch.float64)
    cond = torch.tensor([2, -1, 0])
    s4 = sigma[:, None, None, None]
    # VP: t(sigma) must map back through sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)
    D = _probed(VPPrecondNet, beta_d=19.9, beta_min=0.1, M=1000)
    out = D(x, sigma, cond)
    x_in, c_noise, labels = D.model.seen
    t = c_noise / 999
    assert torch.allclose(((0.5 * 19.9 * t**2 + 0.1 * t).exp() - 1).sqrt(), sigma, rtol=1e-12)
    assert torch.allclose(x_in, x / (s4**2 + 1).sqrt(), rtol=1e-14)
    assert torch.allclose(out, x - s4 * (x_in.sin() + c_noise[:, None, None, None]), rtol=1e-14)
    assert torch.equal(labels, torch.tensor([[0, 0, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.float64))
    eps_t = 1e-5
    assert math.isclose(D.sigma_min, math.sqrt(math.expm1(0.5 * 19.9 * eps_t**2 + 0.1 * eps_t)), rel_tol=0.03)
    assert math.isclose(D.sigma_max, math.sqrt(math.expm1(0.5 * 19.9 + 0.1)), rel_tol=1e-6)
    # VE: D = x + sigma F(x, ln(sigma / 2))
    D = _probed(VEPrecondNet)
    out = D(x, sigma, cond)
    x_in, c_noise, _ = D.model.seen
    assert torch.equal(x_in, x) and torch.allclose(c_noise, (sigma / 2).log(), rtol=1e-14)
    assert torch.allclose(out, x + s4 * (x.sin() + c_noise[:, None, None, None]), rtol=1e-14)
    # EDM: c_skip x + c_out F(c_in x, ln(sigma)/4) with sigma_data = 0.7
    D = _probed(EDMPrecondNet, sigma_data=0.7)
    out = D(x, sigma, cond)
    c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in edm_scalings(sigma, 0.7))
    assert torch.allclose(out, c_skip * x + c_out * ((c_in * x).sin() + c_noise), rtol=1e-14)


@pytest.mark.parametrize("cls", [VPPrecondNet, VEPrecondNet, EDMPrecondNet])
def test_boundary_form_is_identity_at_sigma_min_and_near_d_far_from_it(cls):
    D = _probed(cls)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    far = torch.full((2,), 60.0, dtype=torch.float64)
    plain = D(x, far)
    D.boundary = True
    assert torch.equal(D(x, torch.full((2,), D.boundary_sigma_min, dtype=torch.float64)), x)
    assert not torch.equal(plain, x)
    assert ((D(x, far) - plain).abs().max() / plain.abs().max()).item() < 1e-3


# --- parameter names are NVlabs/edm's ---------------------------------------------------------------
def _block_keys(prefix, skip=False, resample=False, attn=False):
    """State-dict keys of one EDM UNetBlock (training/networks.py): norm0/conv0/affine/norm1/conv1,
    ``skip`` when channels change or it resamples, norm2/qkv/proj with attention, a
    ``resample_filter`` buffer in each resampling conv."""
    wb = ("weight", "bias")
    keys = {f"{prefix}.{m}.{p}" for m in ("norm0", "conv0", "affine", "norm1", "conv1") for p in wb}
    keys |= {f"{prefix}.conv0.resample_filter"} if resample else set()
    keys |= {f"{prefix}.skip.weight", f"{prefix}.skip.bias"} if skip else set()
    keys |= {f"{prefix}.skip.resample_filter"} if skip and resample else set()
    keys |= {f"{prefix}.{m}.{p}" for m in ("norm2", "qkv", "proj") for p in wb} if attn else set()
    return keys


def test_ddpmpp_state_dict_keys_are_edms():
    """Hand-derived from NVlabs/edm SongUNet for resolution 8, channel_mult [1, 2], one block, attention
    at 4x4: encoder 8x8_conv, 8x8_block0, 4x4_down, 4x4_block0; decoder 4x4_in0/in1/block0/block1,
    8x8_up/block0/block1, 8x8_aux_norm/aux_conv. DDPM++ uses resample_proj=True (1x1 skips on
    resampling blocks) and attention only in the last decoder block of a level."""
    D, _ = _direct("vp_ddpmpp_cond")
    m = "model"
    expected = {f"{m}.{k}.{p}" for k in ("map_label", "map_layer0", "map_layer1", "enc.8x8_conv",
                                         "dec.8x8_aux_norm", "dec.8x8_aux_conv") for p in ("weight", "bias")}
    expected |= {f"{m}.map_augment.weight"}
    expected |= _block_keys(f"{m}.enc.8x8_block0")
    expected |= _block_keys(f"{m}.enc.4x4_down", skip=True, resample=True)
    expected |= _block_keys(f"{m}.enc.4x4_block0", skip=True, attn=True)
    expected |= _block_keys(f"{m}.dec.4x4_in0", attn=True) | _block_keys(f"{m}.dec.4x4_in1")
    expected |= _block_keys(f"{m}.dec.4x4_block0", skip=True)
    expected |= _block_keys(f"{m}.dec.4x4_block1", skip=True, attn=True)
    expected |= _block_keys(f"{m}.dec.8x8_up", skip=True, resample=True)
    expected |= _block_keys(f"{m}.dec.8x8_block0", skip=True) | _block_keys(f"{m}.dec.8x8_block1", skip=True)
    sd = D.state_dict()
    assert set(sd) == expected
    shapes = {"model.enc.8x8_conv.weight": [8, 1, 3, 3], "model.map_layer0.weight": [32, 8],
              "model.map_label.weight": [8, 10], "model.map_augment.weight": [8, 9],
              "model.enc.4x4_block0.qkv.weight": [48, 16, 1, 1],
              "model.dec.4x4_block0.conv0.weight": [16, 32, 3, 3],
              "model.enc.4x4_down.conv0.resample_filter": [1, 1, 2, 2],
              "model.dec.8x8_aux_conv.weight": [1, 8, 3, 3]}
    assert {k: list(sd[k].shape) for k in shapes} == shapes
    fresh = VPPrecondNet(**_direct("vp_ddpmpp_cond")[1]).state_dict()  # _direct perturbs buffers too
    assert torch.equal(fresh["model.enc.4x4_down.conv0.resample_filter"], torch.full((1, 1, 2, 2), 0.25))


def test_ncsnpp_adm_and_edm2_key_names():
    sd = _direct("ve_ncsnpp_uncond")[0].state_dict()
    assert sd["model.map_noise.freqs"].shape == (8,)  # FourierEmbedding, 2 x 8 noise channels / 2
    assert sd["model.enc.4x4_aux_residual.weight"].shape == (8, 1, 3, 3)  # the first one starts at the image
    assert sd["model.enc.4x4_down.conv0.resample_filter"].shape == (1, 1, 4, 4)  # [1,3,3,1]
    sd = _direct("edm_adm_cond")[0].state_dict()
    assert "model.map_label.bias" not in sd and sd["model.map_label.weight"].shape == (64, 10)
    # ADM: resample_proj=False, so the channel-preserving down block's skip only resamples
    assert "model.enc.4x4_down.skip.resample_filter" in sd and "model.enc.4x4_down.skip.weight" not in sd
    assert sd["model.enc.4x4_block0.affine.weight"].shape == (256, 64)  # scale and shift
    assert {"model.out_norm.weight", "model.out_conv.bias", "model.dec.4x4_in0.qkv.weight"} <= set(sd)
    sd = _direct("edm2_cond_fp16")[0].state_dict()
    assert sd["unet.enc.8x8_conv.weight"].shape == (16, 5, 3, 3)  # image channels + the constant channel
    assert {"unet.out_gain", "unet.emb_fourier.freqs", "unet.emb_fourier.phases", "unet.emb_noise.weight",
            "unet.emb_label.weight", "unet.enc.4x4_down.emb_gain", "unet.dec.4x4_in0.attn_qkv.weight",
            "logvar_fourier.freqs", "logvar_linear.weight"} <= set(sd)


# --- spec round trip, taps -----------------------------------------------------------------------------
def test_spec_rebuilds_the_network_and_save_load_round_trips(tmp_path):
    path, D, _ = _pickled(tmp_path, "vp_ddpmpp_cond")
    L, meta = load_teacher(path)
    spec = json.loads(json.dumps(L.spec))
    assert spec["type"] == "edm_songunet" and spec["precond"] == "VPPrecond"
    assert spec["precond_kwargs"]["beta_d"] == 18.0 and spec["model_kwargs"]["augment_dim"] == 9
    assert build_denoiser(spec).state_dict().keys() == L.state_dict().keys()
    save_model(tmp_path / "m", L, spec, meta)
    R, _ = load_model(tmp_path / "m")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(R(x, 1.3, torch.tensor([1, -1])), L(x, 1.3, torch.tensor([1, -1])))


@pytest.mark.parametrize("case", ["vp_ddpmpp_cond", "edm_skip_uncond", "edm_adm_cond", "edm2_cond_fp16"])
def test_bottleneck_is_the_lowest_resolution_encoder_output(case):
    D, kwargs = _direct(case)
    path = bottleneck_path(D)
    assert path.endswith(".enc.4x4_block0")
    x = torch.randn(2, kwargs["img_channels"], 8, 8)
    _, feats = forward_with_taps(D, x, torch.ones(2), None, [path])
    assert feats[path].ndim == 4 and feats[path].shape[-1] == 4
    assert [t.split(".")[-1] for t in edm_taps(D)] == ["8x8_block0", "4x4_block0"]


# --- strictness: unknown class / argument / variant ------------------------------------------------------
def test_unknown_class_argument_and_variants_are_named(tmp_path):
    def rename(obj, state):
        if isinstance(obj, nn.ModuleDict):
            return
        if type(obj).__name__ == "GroupNorm" and state["num_groups"] == 2:
            state["num_groups"] = 1

    D, kwargs = _direct("vp_ddpmpp_uncond")
    marker = tmp_path / "SOURCE_WAS_RUN"
    bad = {**kwargs, "channel_mult_foo": 3}
    with pytest.raises(ModelError, match=r"unknown argument\(s\) \['channel_mult_foo'\] for SongUNet"):
        load_teacher(write_edm_pickle(tmp_path / "a.pkl", D, bad, marker))
    with pytest.raises(ModelError, match="unsupported EDM model_type 'FooUNet'"):
        load_teacher(write_edm_pickle(tmp_path / "b.pkl", D, {**kwargs, "model_type": "FooUNet"}, marker))
    with pytest.raises(ModelError, match="num_groups is 1 in the pickle but 2"):
        load_teacher(write_edm_pickle(tmp_path / "c.pkl", D, kwargs, marker, edit=rename))

    class Renamed(_EDMPickler):
        def reducer_override(self, obj):
            out = super().reducer_override(obj)
            if obj is self.top:
                out[1][0]["class_name"] = "iDDPMPrecond"
            return out

    with _edm_modules_while_writing(marker), open(tmp_path / "d.pkl", "wb") as f:
        Renamed(f, D, kwargs).dump({"ema": D})
    with pytest.raises(ModelError, match="unsupported EDM network class 'iDDPMPrecond'"):
        load_teacher(tmp_path / "d.pkl")
    # a missing tensor is a strict-load error, never a partial load
    def drop(obj, state):
        if "_parameters" in state and "bias" in state["_parameters"] and type(obj).__name__ == "Linear":
            state["_parameters"] = {k: v for k, v in state["_parameters"].items() if k != "bias"}

    with pytest.raises(ModelError, match="missing"):
        load_teacher(write_edm_pickle(tmp_path / "e.pkl", D, kwargs, marker, edit=drop))
    assert not marker.exists()


def test_a_snapshot_without_a_network_is_refused(tmp_path):
    with _edm_modules_while_writing(tmp_path / "m") as EasyDict, open(tmp_path / "x.pkl", "wb") as f:
        pickle.dump(EasyDict(loss_fn=_Persistent("EDMLoss", {}), dataset_kwargs={}), f, protocol=4)
    with pytest.raises(ModelError, match=r"holds no EDM network \(found \['dataset_kwargs', 'loss_fn'\]\)"):
        load_teacher(tmp_path / "x.pkl")
    (tmp_path / "t.pkl").write_bytes((tmp_path / "x.pkl").read_bytes()[:40])
    with pytest.raises(ModelError, match="truncated or not an EDM network pickle"):
        load_teacher(tmp_path / "t.pkl")


# --- hostile pickles -------------------------------------------------------------------------------------
def _hostile(name: str, marker) -> bytes:
    """Protocol-0 pickles calling ``name`` to create ``marker``."""
    if name in ("os.system", "posix.system"):
        module, func = name.split(".")
        return f"c{module}\n{func}\n(Vtouch {marker}\ntR.".encode()
    if name == "builtins.eval":
        return f"cbuiltins\neval\n(Vopen({str(marker)!r}, 'w')\ntR.".encode()
    return f"csubprocess\nPopen\n((Vtouch\nV{marker}\nltR.".encode()


HOSTILE = ["os.system", "posix.system", "builtins.eval", "subprocess.Popen"]


def test_the_hostile_pickles_are_live(tmp_path):
    """Control: a plain pickle.load really runs them, so the refusals below mean something."""
    for i, name in enumerate(HOSTILE):
        marker = tmp_path / f"RAN{i}"
        bad = tmp_path / f"h{i}.pkl"
        bad.write_bytes(_hostile(name, marker))
        code = f"import pickle, time; pickle.load(open({str(bad)!r}, 'rb')); time.sleep(0.2)"
        subprocess.run([sys.executable, "-c", code], check=True)
        assert marker.exists(), name


@pytest.mark.parametrize("command", ["eval", "convert"])
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_pickles_are_refused_by_the_cli(tmp_path, capsys, command, name):
    marker = tmp_path / "RAN"
    bad = tmp_path / "hostile.pkl"
    bad.write_bytes(_hostile(name, marker))
    out = tmp_path / "out"
    args = ["eval", str(bad), "--data", "digits8", "--n", "8"] if command == "eval" else \
        ["convert", str(bad), "--out", str(out)]
    assert main(args) == 2
    _one_error_line(capsys, f"refused to load the global '{name}'", "never runs pickled code")
    assert not marker.exists() and not out.exists()


def test_a_pickle_cannot_rewrite_the_allowed_stand_ins(tmp_path):
    """BUILD on an allowed class object (here: replace ModuleDict's __setstate__ by the EasyDict
    stand-in) fails, and the class cannot be modified by setattr either."""
    before = edm_pickle.ModuleDict.__setstate__
    bad = tmp_path / "rewrite.pkl"
    bad.write_bytes(b"ctorch.nn.modules.container\nModuleDict\n(N(dV__setstate__\ncdnnlib.util\nEasyDict\n"
                    b"stb.")
    with pytest.raises(ModelError, match="truncated or not an EDM network pickle"):
        load_teacher(bad)
    with pytest.raises(pickle.UnpicklingError, match="modify the class"):
        edm_pickle.ModuleDict.__setstate__ = dict
    assert edm_pickle.ModuleDict.__setstate__ is before and "__setstate__" not in vars(edm_pickle.ModuleDict)


def test_a_hostile_global_inside_an_otherwise_valid_snapshot_is_refused(tmp_path, capsys):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'RAN'}",))

    D, kwargs = _direct("vp_ddpmpp_uncond")
    path = write_edm_pickle(tmp_path / "mixed.pkl", D, kwargs, tmp_path / "SRC", extra={"extras": Payload()})
    assert main(["convert", str(path), "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, f"refused to load the global '{os.system.__module__}.system'")
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "SRC").exists()
    assert _foreign_modules() == []


# --- through the CLI ----------------------------------------------------------------------------------
@pytest.mark.parametrize("label_dim", [10, 0], ids=["cond", "uncond"])
def test_distill_from_a_pickle_then_convert_and_eval(tmp_path, capsys, label_dim):
    kwargs = {"img_resolution": 8, "img_channels": 1, "label_dim": label_dim, "use_fp16": False,
              "model_type": "SongUNet", **{**DDPMPP, "dropout": 0.1}}
    torch.manual_seed(0)
    D = _perturb(VPPrecondNet(**kwargs), seed=3)
    with torch.no_grad():  # a small output so the teacher is a sane denoiser: D ~ x at small sigma
        for p in D.model.dec["8x8_aux_conv"].parameters():
            p.mul_(0.01)
    pkl = write_edm_pickle(tmp_path / "tiny.pkl", D, kwargs, tmp_path / "SRC")
    common = ["--iters", "3", "--batch", "8", "--no-progress", "train.eval_n=16", "train.eval_every=0"]
    assert main(["distill", "--teacher", str(pkl), "--method", "sid", "--out", str(tmp_path / "x"),
                 *common]) == 2
    _one_error_line(capsys, "data.name")
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(pkl), "--method", "sid", "--extra", "el=1", "--out", str(out),
                 *common, "data.name=digits8"]) == 0
    doc = json.loads((out / "model.json").read_text())
    assert doc["spec"]["type"] == "edm_songunet" and doc["spec"]["precond"] == "VPPrecond"
    assert doc["meta"]["data"]["num_classes"] == (10 if label_dim else 0)
    conv = tmp_path / "converted"
    assert main(["convert", str(pkl), "--out", str(conv)]) == 0
    T, _ = load_teacher(pkl)
    C, _ = load_model(conv)
    x = torch.randn(3, 1, 8, 8)
    cond = torch.tensor([1, 2, -1]) if label_dim else None
    assert torch.equal(C(x, 0.7, cond), T(x, 0.7, cond))
    js = tmp_path / "e.json"
    assert main(["eval", str(conv), "--data", "digits8", "--nfe", "3", "--n", "16", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["nfe"] == 3
    assert main(["eval", str(out), "--data", "digits8", "--n", "16"]) == 0
    assert main(["sample", str(pkl), "--n", "4", "--nfe", "3", "--out", str(tmp_path / "t.npz")]) == 0


def test_dmd_gan_head_and_cd_on_a_pickle_teacher(tmp_path):
    """DMD2's GAN head sits on the fake network's bottleneck (model.enc.4x4_block0); CD needs the
    boundary form, and the exported student keeps D(x, sigma_min) = x (sigma_data 0.5: exact)."""
    common = ["--iters", "2", "--batch", "8", "--no-progress", "train.eval_n=16", "train.eval_every=0",
              "data.name=digits8"]
    path, _, _ = _pickled(tmp_path, "edm_ncsnpp_cond")
    assert main(["distill", "--teacher", str(path), "--method", "dmd", "--out", str(tmp_path / "dmd"),
                 *common, "dmd.gan_gen_weight=0.01"]) == 0
    path, _, _ = _pickled(tmp_path, "ve_ncsnpp_uncond")
    assert main(["distill", "--teacher", str(path), "--method", "cd", "--out", str(tmp_path / "cd"),
                 *common]) == 0
    G, _ = load_model(tmp_path / "cd")
    G = G.double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    at_min = torch.full((2,), G.boundary_sigma_min, dtype=torch.float64)
    assert G.spec["boundary"] and torch.equal(G(x, at_min), x)


@pytest.mark.parametrize("case,label_dim", [("edm_adm_cond", 10), ("edm_adm_cond", 0),
                                            ("edm_ncsnpp_cond", 10), ("vp_ddpmpp_uncond", 0)],
                         ids=["adm-edm-cond", "adm-edm-uncond", "ncsnpp-edm-cond", "ddpmpp-vp-uncond"])
def test_sid_with_el_distills_every_architecture_and_precond(tmp_path, case, label_dim):
    """Issue 18's command, `distill --teacher X.pkl --method sid --extra el=1`, on DhariwalUNet and
    SongUNet pickles with EDM and VP preconditioning, conditional and not."""
    cls, _, channels, extra = CASES[case]
    kwargs = {"img_resolution": 8, "img_channels": channels, "label_dim": label_dim, "use_fp16": False,
              **copy.deepcopy(extra)}
    torch.manual_seed(0)
    D = _perturb(cls(**kwargs))
    pkl = write_edm_pickle(tmp_path / f"{case}.pkl", D, kwargs, tmp_path / "SRC")
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(pkl), "--method", "sid", "--extra", "el=1", "--out", str(out),
                 "--iters", "2", "--batch", "8", "--no-progress", "train.eval_n=16", "train.eval_every=0",
                 "data.name=digits8"]) == 0
    meta = json.loads((out / "model.json").read_text())["meta"]
    assert meta["data"]["num_classes"] == label_dim and not (tmp_path / "SRC").exists()
