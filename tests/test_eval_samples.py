"""`fewstep eval --samples FILE --data D`: images made by any tool, in the layouts and ranges that
fewstep, diffusers (output_type='np') and PIL write, give the same metrics as the same images
evaluated inside fewstep; wrong shapes and ranges are one-line errors."""

import json

import numpy as np
import pytest
import torch

from fewstep.cli import main
from fewstep.data import load_dataset
from fewstep.train.evaluate import metric_space, score_samples

KEYS = ("fd", "mmd", "precision", "recall", "density", "coverage", "kid")


def _eval(tmp_path, *args) -> dict:
    js = tmp_path / "m.json"
    assert main(["eval", *args, "--json", str(js)]) == 0
    return json.loads(js.read_text())


@pytest.fixture(scope="module")
def digits_like():
    """200 'generated' digits8-shaped images in [-1, 1] (real test digits plus noise, clipped)."""
    x = load_dataset("digits8").x_test[:200]
    g = torch.Generator().manual_seed(0)
    return (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _reference(x) -> dict:
    return score_samples(metric_space(load_dataset("digits8")), x)


def test_fewstep_sample_file_matches_eval_of_the_model(tmp_path):
    """The npz `fewstep sample` writes, evaluated with --samples, gives `fewstep eval MODEL`'s metrics
    exactly (the same samples, the same reference set and floors)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       norm_num_groups=4, layers_per_block=1, add_attention=False,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "t")
    DDPMScheduler().save_config(tmp_path / "t")
    s = tmp_path / "s.npz"
    assert main(["sample", str(tmp_path / "t"), "--n", "100", "--nfe", "3", "--out", str(s)]) == 0
    model = _eval(tmp_path, str(tmp_path / "t"), "--n", "100", "--nfe", "3", "--data", "digits8")
    ext = _eval(tmp_path, "--samples", str(s), "--data", "digits8")
    for k in (*KEYS, "fd_floor", "n_samples"):
        assert ext[k] == model[k], k


def test_every_layout_gives_the_same_metrics(tmp_path, digits_like):
    x = digits_like
    ref = _reference(x)
    nhwc01 = (x / 2 + 0.5).permute(0, 2, 3, 1).numpy()  # diffusers output_type="np"
    files = {"nchw.npy": x.numpy(), "nhwc01.npz": nhwc01, "nhw.npy": x[:, 0].numpy()}
    for name, arr in files.items():
        (np.save if name.endswith(".npy") else lambda p, a: np.savez(p, images=a))(tmp_path / name, arr)
        got = _eval(tmp_path, "--samples", str(tmp_path / name), "--data", "digits8")
        for k in KEYS:
            assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), (name, k)
    # uint8 (PIL / numpy_to_pil): quantised, so compare with the quantised images; a PNG folder of
    # the same uint8 images is the same set
    u8 = np.round(nhwc01 * 255).astype(np.uint8)
    ref8 = _reference(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.savez(tmp_path / "u8.npz", x=u8)
    from PIL import Image

    (tmp_path / "png").mkdir()
    for i, im in enumerate(u8):
        Image.fromarray(im[..., 0], "L").save(tmp_path / "png" / f"{i:04d}.png")
    for given in ("u8.npz", "png"):
        got = _eval(tmp_path, "--samples", str(tmp_path / given), "--data", "digits8")
        for k in KEYS:
            assert got[k] == pytest.approx(ref8[k], rel=1e-6, abs=1e-8), (given, k)
    assert abs(ref8["fd"] - ref["fd"]) > 0  # quantisation is visible: the comparison is not vacuous


def test_vectors(tmp_path):
    data = load_dataset("ring8")
    x = data.test_samples(300, torch.Generator().manual_seed(3))[0]
    np.save(tmp_path / "v.npy", x.numpy())
    got = _eval(tmp_path, "--samples", str(tmp_path / "v.npy"), "--data", "ring8")
    ref = score_samples(metric_space(data), x)
    assert got["modes_covered"] == ref["modes_covered"] == 8
    assert got["mmd"] == pytest.approx(ref["mmd"], rel=1e-6)


BAD = [
    ("shape.npy", np.zeros((10, 1, 8, 9), np.float32), "for 1x8x8 data give [N, 1, 8, 8]"),
    ("nhwc.npy", np.full((10, 8, 8, 1), 2.0, np.float32), "channels-last float images must lie in [0, 1]"),
    ("255.npy", np.full((10, 1, 8, 8), 200.0, np.float32), "looks like 0..255 floats"),
    ("pt.npy", np.full((10, 1, 8, 8), 0.5, np.float32), "looks like diffusers' output_type='pt'"),
    ("nan.npy", np.full((10, 1, 8, 8), np.nan, np.float32), "NaN/Inf"),
    ("one.npy", np.zeros((1, 1, 8, 8), np.float32) - 0.5, "at least 2"),
    ("keys.npz", {"a": np.zeros((3, 1, 8, 8)), "b": np.zeros(3)}, "none named x / images / samples"),
    ("u16.npy", np.full((4, 1, 8, 8), 300, np.int64), "0..255"),
]


@pytest.mark.parametrize("name,arr,match", BAD, ids=[b[0] for b in BAD])
def test_bad_samples_are_one_line_errors(tmp_path, capsys, name, arr, match):
    path = tmp_path / name
    np.savez(path, **arr) if isinstance(arr, dict) else np.save(path, arr)
    assert main(["eval", "--samples", str(path), "--data", "digits8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err, err


def test_usage_errors(tmp_path, capsys):
    np.save(tmp_path / "v.npy", np.zeros((5, 3), np.float32))
    for args, match in [(["--samples", str(tmp_path / "v.npy")], "needs --data"),
                        (["--samples", str(tmp_path / "v.npy"), "--data", "ring8"], "2-D vectors"),
                        (["--samples", str(tmp_path / "none.npz"), "--data", "ring8"], "do not exist"),
                        (["runs/x", "--samples", str(tmp_path / "v.npy"), "--data", "ring8"], "not both"),
                        ([], "needs a model directory or --samples")]:
        assert main(["eval", *args]) == 2
        assert match in capsys.readouterr().err
