"""fewstep.data: built-in and user data sources, the sampling contract, and one-line DataErrors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fewstep.data import Dataset, load_dataset
from fewstep.errors import DataError, FewstepError


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_one_line_error(fn, *needles):
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, FewstepError)
    for n in needles:
        assert n.lower() in msg.lower(), msg
    return msg


# ---------------------------------------------------------------- built-in mixtures


def test_ring8_unconditional_and_conditional():
    d = load_dataset("ring8")
    assert isinstance(d, Dataset) and (d.kind, d.shape, d.num_classes) == ("vector", (2,), 0)
    assert d.x_train is None and d.mixture.num_components == 8
    x, y = d.train_batch(4000, g())
    assert x.dtype == torch.float32 and x.shape == (4000, 2) and y is None
    assert torch.allclose(x.norm(dim=1), torch.full((4000,), 2.0), atol=0.3)
    assert torch.equal(x, d.train_batch(4000, g())[0])  # pure function of the generator

    dc = load_dataset("ring8", conditional=True)
    x, y = dc.train_batch(500, g(1))
    assert dc.num_classes == 8 and y.dtype == torch.long
    nearest = torch.cdist(x.double(), dc.mixture.means).argmin(1)
    assert torch.equal(nearest, y)
    xt, yt = dc.test_samples(10, g(2))
    assert xt.shape == (10, 2) and yt.shape == (10,)
    assert dc.train_samples(7, g(3))[0].shape == (7, 2)
    with pytest.raises(ValueError):
        dc.test_samples(None)


def test_grid25_means_and_std():
    d = load_dataset("grid25", conditional=True)
    assert d.num_classes == 25
    vals = sorted(set(d.mixture.means[:, 0].tolist()))
    assert vals == [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert torch.allclose(d.mixture.mode_stds, torch.full((25, 2), 0.05, dtype=torch.float64))


# ---------------------------------------------------------------- digits8


def test_digits8_splits_and_sampling():
    d = load_dataset("digits8")
    assert (d.kind, d.shape, d.num_classes) == ("image", (1, 8, 8), 0)
    assert d.x_train.shape == (900, 1, 8, 8) and d.x_test.shape == (897, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.x_train.min() == -1 and d.x_train.max() == 1
    assert torch.allclose((d.x_test + 1) * 8, ((d.x_test + 1) * 8).round())  # levels k/8 - 1
    x, y = d.train_batch(16, g())
    assert x.shape == (16, 1, 8, 8) and y is None
    assert torch.equal(x, d.train_batch(16, g())[0])

    dc = load_dataset("digits8", conditional=True)
    assert dc.num_classes == 10 and set(dc.y_train.tolist()) == set(range(10))
    assert torch.equal(dc.x_train, d.x_train)  # fixed shuffle
    xa, ya = dc.test_samples(None, g())
    assert xa.shape[0] == 897 and torch.equal(ya, dc.y_test)
    xs, ys = dc.test_samples(100, g(5))
    assert xs.shape == (100, 1, 8, 8) and torch.equal(xs, dc.test_samples(100, g(5))[0])
    assert dc.train_samples(2000, g())[0].shape[0] == 900
    assert "digits8" in repr(dc) and "tensor" not in repr(dc)


def test_import_is_light():
    code = "import sys, fewstep.data; print('sklearn' in sys.modules or 'PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- mixture files


def test_mixture_files_json_and_yaml(tmp_path):
    p = tmp_path / "iso.json"
    p.write_text(json.dumps({"means": [[0, 0], [3, 0], [0, 3]], "stds": [0.1, 0.2, 0.3],
                             "weights": [1, 1, 2]}))
    d = load_dataset(str(p), conditional=True)
    assert (d.kind, d.shape, d.num_classes, d.name) == ("vector", (2,), 3, "iso.json")
    assert torch.allclose(d.mixture.weights, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    assert torch.allclose(d.mixture.covs[2], 0.09 * torch.eye(2, dtype=torch.float64))

    y = tmp_path / "diag.yaml"
    y.write_text("means: [[0, 0, 0], [1, 1, 1]]\nstds: [[0.1, 0.2, 0.3], [1, 1, 1]]\n")
    d = load_dataset(str(y))
    assert d.shape == (3,) and d.num_classes == 0
    assert torch.allclose(d.mixture.covs[0].diagonal(), torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64))

    c = tmp_path / "full.yml"
    c.write_text("means: [[0, 0]]\ncovs: [[[1.0, 0.5], [0.5, 2.0]]]\n")
    d = load_dataset(str(c))
    x, _ = d.train_batch(20000, g())
    assert abs(float(torch.cov(x.T.double())[0, 1]) - 0.5) < 0.05


@pytest.mark.parametrize("content, needle", [
    ({"means": [[0, 0], [1, 1]], "stds": [0.1]}, "stds"),
    ({"means": [[0, 0]], "stds": [-0.1]}, "positive"),
    ({"means": [[0, 0]], "covs": [[[1, 2], [2, 1]]]}, "positive definite"),
    ({"means": [[0, 0]], "covs": [[[1, 0.5], [0.1, 1]]]}, "symmetric"),
    ({"means": [[0, 0]], "stds": [0.1], "cov": 1}, "unknown keys"),
    ({"stds": [0.1]}, "means"),
    ({"means": [[0, 0]]}, "exactly one"),
    ({"means": [[0, 0], [1]], "stds": [0.1, 0.1]}, "means"),
    ({"means": [[0, 0]], "stds": [0.1], "weights": [-1]}, "weights"),
    ({"means": [[0, "a"]], "stds": [0.1]}, "means"),
    ([1, 2], "mapping"),
])
def test_bad_mixture_files(tmp_path, content, needle):
    p = tmp_path / "m.json"
    p.write_text(json.dumps(content))
    assert_one_line_error(lambda: load_dataset(str(p)), needle)


def test_mixture_file_syntax_error(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("means: [[0, 0]\nstds: ")
    assert_one_line_error(lambda: load_dataset(str(p)), "unreadable", "m.yaml")


# ---------------------------------------------------------------- arrays


def test_npy_vectors_split(tmp_path):
    x = np.random.RandomState(1).randn(50, 3)
    np.save(tmp_path / "v.npy", x)
    d = load_dataset(str(tmp_path / "v.npy"))
    assert (d.kind, d.shape, d.num_classes) == ("vector", (3,), 0)
    assert d.x_train.shape == (45, 3) and d.x_test.shape == (5, 3) and d.x_train.dtype == torch.float32
    both = torch.cat([d.x_train, d.x_test]).double()
    assert torch.allclose(both.sort(0).values, torch.tensor(x).sort(0).values, atol=1e-6)
    perm = np.random.RandomState(0).permutation(50)  # the documented split
    assert np.allclose(d.x_test.numpy(), x[perm[45:]], atol=1e-6)
    xb, yb = d.train_batch(8, g())
    assert xb.shape == (8, 3) and yb is None


def test_npy_images_uint8_and_float(tmp_path):
    u = np.random.RandomState(0).randint(0, 256, size=(20, 6, 5), dtype=np.uint8)
    np.save(tmp_path / "gray.npy", u)
    d = load_dataset(str(tmp_path / "gray.npy"))
    assert (d.kind, d.shape) == ("image", (1, 6, 5))
    allx = torch.cat([d.x_train, d.x_test])
    assert allx.min() >= -1 and allx.max() <= 1
    assert torch.allclose(torch.sort(allx.flatten()).values,
                          torch.sort(torch.tensor(u, dtype=torch.float32).flatten() / 127.5 - 1).values)
    f = np.random.RandomState(0).uniform(-1, 1, size=(10, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "rgb.npy", f)
    d = load_dataset(str(tmp_path / "rgb.npy"))
    assert d.shape == (3, 4, 4) and d.x_test.shape == (1, 3, 4, 4)


def test_npz_with_labels(tmp_path):
    x = np.random.RandomState(0).randn(30, 2).astype(np.float32)
    y = np.arange(30) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_dataset(str(tmp_path / "d.npz"), conditional=True)
    assert d.num_classes == 3 and d.y_train.dtype == torch.long and d.y_test.shape == (3,)
    xb, yb = d.train_batch(5, g())
    assert xb.shape == (5, 2) and yb.shape == (5,)
    assert load_dataset(str(tmp_path / "d.npz")).train_batch(5, g())[1] is None
    np.savez(tmp_path / "f.npz", x=x, y=y.astype(np.float64))  # integral floats are fine
    assert load_dataset(str(tmp_path / "f.npz"), conditional=True).num_classes == 3


@pytest.mark.parametrize("name, arrays, needle", [
    ("rank1.npy", np.zeros(10), "rank 1"),
    ("rank5.npy", np.zeros((2, 1, 2, 2, 2)), "rank 5"),
    ("nan.npy", np.array([[0.0, np.nan], [1.0, 2.0]]), "nan"),
    ("inf.npy", np.array([[0.0, np.inf], [1.0, 2.0]]), "inf"),
    ("empty.npy", np.zeros((0, 3)), "empty"),
    ("str.npy", np.array([["a", "b"], ["c", "d"]]), "non-numeric"),
    ("bool.npy", np.ones((4, 2), dtype=bool), "non-numeric"),
    ("one.npy", np.zeros((1, 3)), "one.npy has 1 sample"),
    ("range.npy", np.full((4, 2, 2), 3.0), "[-1, 1]"),
    ("int.npy", np.full((4, 2, 2), 300), "0..255"),
    ("hwc.npy", np.zeros((4, 8, 8, 3), dtype=np.uint8), "channels-last"),
    ("nox.npz", {"data": np.zeros((4, 2))}, "no array 'x'"),
    ("ylen.npz", {"x": np.zeros((4, 2)), "y": np.zeros(3, dtype=int)}, "3 labels"),
    ("yfloat.npz", {"x": np.zeros((4, 2)), "y": np.array([0.5, 1, 2, 0])}, "integers"),
    ("yneg.npz", {"x": np.zeros((4, 2)), "y": np.array([0, -1, 2, 0])}, "non-negative"),
    ("y2d.npz", {"x": np.zeros((4, 2)), "y": np.zeros((4, 2), dtype=int)}, "one integer per sample"),
])
def test_bad_arrays(tmp_path, name, arrays, needle):
    p = tmp_path / name
    if name.endswith(".npz"):
        np.savez(p, **arrays)
    else:
        np.save(p, arrays)
    assert_one_line_error(lambda: load_dataset(str(p)), needle)


def test_object_and_corrupt_arrays(tmp_path):
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert_one_line_error(lambda: load_dataset(str(p)), "dtype=object")
    q = tmp_path / "bad.npy"
    q.write_bytes(b"not a numpy file at all")
    assert_one_line_error(lambda: load_dataset(str(q)), "bad.npy", "not a valid .npy")
    r = tmp_path / "bad.npz"
    r.write_bytes(b"PK garbage")
    assert_one_line_error(lambda: load_dataset(str(r)), "bad.npz", "not a valid .npz")
    r.write_bytes(b"PK\x03\x04 truncated zip")
    assert_one_line_error(lambda: load_dataset(str(r)), "bad.npz", "not a readable")


def test_unlabelled_data_cannot_be_conditional(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((10, 2)))
    assert_one_line_error(lambda: load_dataset(str(tmp_path / "v.npy"), conditional=True), "no labels")


# ---------------------------------------------------------------- image folders


def _png(path, arr, mode=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode=mode).save(path)


def test_flat_grayscale_folder(tmp_path):
    rs = np.random.RandomState(0)
    for i in range(12):
        _png(tmp_path / "imgs" / f"{i:02d}.png", rs.randint(0, 256, (5, 4)))
    d = load_dataset(str(tmp_path / "imgs"))
    assert (d.kind, d.shape, d.num_classes, d.y_train) == ("image", (1, 5, 4), 0, None)
    assert d.x_train.shape[0] + d.x_test.shape[0] == 12 and d.x_test.shape[0] == 1
    assert d.x_train.min() >= -1 and d.x_train.max() <= 1
    assert_one_line_error(lambda: load_dataset(str(tmp_path / "imgs"), conditional=True), "no labels")


def test_class_subfolders_rgb_and_jpg(tmp_path):
    rs = np.random.RandomState(0)
    for c in ("cat", "dog"):
        for i in range(6):
            _png(tmp_path / "pets" / c / f"{i}.png", rs.randint(0, 256, (4, 4, 3)))
    (tmp_path / "pets" / "empty").mkdir()
    d = load_dataset(str(tmp_path / "pets"), conditional=True)
    assert d.shape == (3, 4, 4) and d.num_classes == 2 and d.class_names == ("cat", "dog")
    assert sorted(torch.cat([d.y_train, d.y_test]).tolist()) == [0] * 6 + [1] * 6
    from PIL import Image

    (tmp_path / "j").mkdir()
    for i in range(3):
        Image.fromarray(rs.randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(tmp_path / "j" / f"{i}.jpg")
    assert load_dataset(str(tmp_path / "j")).shape == (3, 8, 8)


def test_image_folder_errors(tmp_path):
    _png(tmp_path / "a" / "0.png", np.zeros((4, 4)))
    (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG broken")
    assert_one_line_error(lambda: load_dataset(str(tmp_path / "a")), "1.png")
    _png(tmp_path / "a" / "1.png", np.random.RandomState(0).randint(0, 256, (64, 64)))
    data = (tmp_path / "a" / "1.png").read_bytes()
    (tmp_path / "a" / "1.png").write_bytes(data[: len(data) // 2])  # truncated: header ok, pixels not
    assert_one_line_error(lambda: load_dataset(str(tmp_path / "a")), "cannot read image", "1.png")

    _png(tmp_path / "b" / "0.png", np.zeros((4, 4)))
    _png(tmp_path / "b" / "1.png", np.zeros((5, 4)))
    assert_one_line_error(lambda: load_dataset(str(tmp_path / "b")), "differ", "1.png")

    _png(tmp_path / "c" / "0.png", np.zeros((4, 4)))
    _png(tmp_path / "c" / "1.png", np.zeros((4, 4, 3)))
    assert_one_line_error(lambda: load_dataset(str(tmp_path / "c")), "differ")

    _png(tmp_path / "d" / "0.png", np.zeros((4, 4, 4)), mode="RGBA")
    assert_one_line_error(lambda: load_dataset(str(tmp_path / "d")), "RGBA")

    (tmp_path / "e").mkdir()
    assert_one_line_error(lambda: load_dataset(str(tmp_path / "e")), "no .png")

    _png(tmp_path / "f" / "0.png", np.zeros((4, 4)))
    _png(tmp_path / "f" / "k" / "1.png", np.zeros((4, 4)))
    assert_one_line_error(lambda: load_dataset(str(tmp_path / "f")), "subfolder")

    assert_one_line_error(lambda: load_dataset(str(tmp_path / "a" / "0.png")), "folder")


# ---------------------------------------------------------------- names and paths


def test_unknown_name_suggests_nearest():
    msg = assert_one_line_error(lambda: load_dataset("ring9"), "unknown data set", "did you mean 'ring8'")
    assert "digits8" in msg
    assert_one_line_error(lambda: load_dataset("digits"), "did you mean 'digits8'")
    assert_one_line_error(lambda: load_dataset("zzzzzz"), "unknown data set")


def test_missing_and_unsupported_paths(tmp_path):
    assert_one_line_error(lambda: load_dataset(str(tmp_path / "nope.npy")), "does not exist", "nope.npy")
    assert_one_line_error(lambda: load_dataset("data/nothing"), "does not exist")
    (tmp_path / "t.csv").write_text("1,2\n")
    assert_one_line_error(lambda: load_dataset(str(tmp_path / "t.csv")), "unsupported")
